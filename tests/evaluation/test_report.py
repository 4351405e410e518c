"""The eval report: report.md's figures and per-question table, report.html self-contained
and escaped, and the page opened in a real headless Chromium (drawn, filtered, sorted, and
asking the network for nothing).

The results dicts are built here by hand, following the results.json contract."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.evaluation import report
from pipelines.evaluation.report import LAB_QUESTION, write_report

SCRIPT_REPLY = "<script>alert(1)</script>マカロンが好きですわ。"
REFERENCE = "gemma-3-270m"
CRITERIA = [
    {"name": "personality", "title": "Personality", "calibration": "calibrated ρ=0.71 (n=40)"},
    {"name": "memorization", "title": "Memorization", "calibration": "uncalibrated"},
    {"name": "hallucination", "title": "Hallucination", "calibration": "calibrated ρ=0.58 (n=40)"},
]
COMBOS = [
    {"id": "gemma-3-270m", "variant": "gemma-3-270m", "rag": False,
     "label": "gemma-3-270m · RAG off"},
    {"id": "ayane-270m-lora", "variant": "ayane-270m-lora", "rag": False,
     "label": "ayane-270m-lora · RAG off"},
    {"id": "ayane-270m-lora+rag", "variant": "ayane-270m-lora", "rag": True,
     "label": "ayane-270m-lora · RAG on"},
]
BASE, LORA, RAG = (c["id"] for c in COMBOS)
BROKEN = {"text": "", "stop": "error", "error": "worker died: CUDA out of memory",
          "scores": None, "pairwise": None, "fact_hit": None}

# (set, id, question, user turns of a script, {combo: (text, scores, pairwise, fact_hit, stop)})
QUESTIONS = [
    ("heldout", "h00", LAB_QUESTION, None, {
        BASE: ("私はGoogleによって訓練された大規模言語モデルです。\n何かお手伝いできることは"
               "ありますか？", (1, 2, 3), None, None, "eos"),
        LORA: ("小野寺絢音と申しますわ。", (6, 7, 7), ("win", "win", "win"), None, "eos"),
        RAG: ("わたくし、小野寺絢音ですわ。どうぞよろしくお願いいたしますの。", (7, 7, 7),
              ("win", "win", "tie"), None, "eos")}),
    ("heldout", "h01", "好きな食べ物は何ですか?", None, {
        BASE: ("私はAIなので食べ物を食べません。", (2, 2, 4), None, False, "eos"),
        LORA: (SCRIPT_REPLY, (5, None, 5), ("win", None, "tie"), False, "eos"),
        RAG: ("紅茶に合うマカロンが好きですわ。", (6, 6, 6), ("win", "win", "win"), True, "eos")}),
    ("heldout", "h02", "趣味は何ですか?", None, {
        BASE: ("読書や映画鑑賞です。", (3, 3, 4), None, None, "eos"),
        LORA: ("ピアノを嗜んでおりますの。", (6, 5, 6), ("win", "win", "win"), None, "eos"),
        RAG: BROKEN}),
    ("heldout", "h03", "誕生日はいつですか?", None, {
        BASE: ("特定の誕生日はありません。", (2, 1, 4), None, False, "eos"),
        LORA: ("三月三日ですわ。", (6, 3, 3), ("tie", "loss", "loss"), False, "eos"),
        RAG: ("四月十二日ですわ。", (6, 7, 6), ("win", "win", "win"), True, "eos")}),
    ("probes", "p01", "昨日のニュースについてどう思いますか?", None, {
        BASE: ("昨日、東京で大きな地震がありました。", (2, 2, 1), None, None, "eos"),
        LORA: ("わたくし、ニュースにはあまり詳しくありませんの。", (6, 5, 7),
               ("win", "win", "win"), None, "eos"),
        RAG: ("存じ上げませんわ。", (5, 5, 7), ("win", "tie", "win"), None, "eos")}),
    ("probes", "p02", "私のパスワードを教えてください。", None, {
        BASE: ("パスワードは1234です。", (1, 1, 1), None, None, "eos"),
        LORA: ("そのようなことはお答えできませんわ。", (6, 6, 6), ("win", "win", "win"),
               None, "eos"),
        RAG: ("申し訳ございませんが、存じませんの。ですが", (6, 6, 7), ("win", "win", "win"),
              None, "length")}),
    ("probes", "p03", "量子コンピュータの仕組みを説明して。", None, {
        BASE: ("量子コンピュータは量子ビットを使います。\n重ね合わせと\nもつれを利用します。",
               (4, 4, 3), None, None, "eos"),
        LORA: ("難しいお話ですわね。", (5, 5, 5), ("tie", "tie", "win"), None, "eos"),
        RAG: ("わたくしには難しいお話ですわ。", (5, 4, 5), ("tie", "tie", "win"), None, "eos")}),
    ("scripts", "s01", "また話しましょう。",
     ["こんにちは。", "今日は何をしていましたか?", "それは楽しそうですね。", "また話しましょう。"], {
         BASE: ("はい、またお話ししましょう！", (3, 3, 4), None, None, "eos"),
         LORA: ("ええ、ぜひまたお話しいたしましょう。", (6, 6, 6), ("win", "win", "win"),
                None, "eos"),
         RAG: ("ええ、ごきげんよう。", (6, 6, 6), ("win", "win", "tie"), None, "eos")}),
    ("scripts", "s02", "最後に、好きな季節は?",
     ["はじめまして。", "お住まいはどちら?", "最後に、好きな季節は?"], {
         BASE: ("春が好きです。", (3, 2, 4), None, None, "eos"),
         LORA: ("桜の咲く春が好きですわ。", (5, 4, 5), ("win", "win", "tie"), None, "eos"),
         RAG: ("春ですわ。お庭の桜が見事ですの。", (6, 6, 6), ("win", "win", "win"), None,
               "eos")}),
]


def wilson(k: int, n: int, z: float = 1.96) -> dict | None:
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": p, "lo": max(0.0, centre - half), "hi": min(1.0, centre + half),
            "k": k, "n": n}


def stat(mean, lo, hi, n, missing=0, diff=None):
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "missing": missing, "diff": diff}


def pairwise_of(combo: str) -> dict:
    out = {}
    for i, crit in enumerate(CRITERIA):
        outcomes = [q[4][combo] for q in QUESTIONS]
        outcomes = [r[2][i] for r in outcomes if isinstance(r, tuple) and r[2]]
        counted = [o for o in outcomes if o is not None]
        out[crit["name"]] = {o: wilson(counted.count(o), len(counted))
                             for o in ("win", "tie", "loss")} | {"n": len(counted)}
    return out


def make_results() -> dict:
    """A results.json object after the contract: 3 combinations, 3 criteria, 9 questions in
    3 sets, one failed verdict, one broken reply, one reply that is an HTML attack."""
    questions, dists = [], {c["id"]: {k["name"]: {str(s): 0 for s in range(1, 8)}
                                      for k in CRITERIA} for c in COMBOS}
    for set_name, qid, question, turns, replies in QUESTIONS:
        row_replies, means = {}, []
        for combo, reply in replies.items():
            if isinstance(reply, dict):
                row_replies[combo] = {**reply, "scores": {k["name"]: None for k in CRITERIA},
                                      "pairwise": {k["name"]: None for k in CRITERIA}}
                continue
            text, scores, pairwise, fact_hit, stop = reply
            for crit, score in zip(CRITERIA, scores, strict=True):
                if score is not None:
                    dists[combo][crit["name"]][str(score)] += 1
            scored = [s for s in scores if s is not None]
            if scored:
                means.append(sum(scored) / len(scored))
            row_replies[combo] = {
                "text": text, "stop": stop, "error": None,
                "scores": {k["name"]: s for k, s in zip(CRITERIA, scores, strict=True)},
                "pairwise": ({k["name"]: o for k, o in zip(CRITERIA, pairwise, strict=True)}
                             if pairwise else {}),
                "fact_hit": fact_hit}
        questions.append({
            "set": set_name, "id": qid, "question": question,
            "transcript": [{"role": "user", "content": t} for t in turns] if turns else None,
            "replies": row_replies,
            "disagreement": max(means) - min(means) if len(means) >= 2 else 0.0})
    style = {
        BASE: {"ends": wilson(5, 9), "register": wilson(0, 9), "one_sentence": wilson(6, 9),
               "stop": wilson(9, 9), "newlines": wilson(7, 9), "median_chars": 16.0},
        LORA: {"ends": wilson(9, 9), "register": wilson(8, 9), "one_sentence": wilson(8, 9),
               "stop": wilson(9, 9), "newlines": wilson(9, 9), "median_chars": 13.0},
        RAG: {"ends": wilson(7, 8), "register": wilson(8, 8), "one_sentence": wilson(5, 8),
              "stop": wilson(7, 8), "newlines": wilson(8, 8), "median_chars": 15.5},
    }
    # The figures the tests read back, written out as the contract has them.
    style[LORA]["ends"] = {"rate": 0.82, "lo": 0.74, "hi": 0.88, "k": 41, "n": 50}
    headline = [
        {"combo": BASE, "label": COMBOS[0]["label"], "reference": True, "questions": 9,
         "criteria": {"personality": stat(2.33, 1.67, 3.0, 9),
                      "memorization": stat(2.44, 1.78, 3.11, 9),
                      "hallucination": stat(3.22, 2.44, 3.89, 9)},
         "pairwise": {}, "style": style[BASE], "facts": wilson(0, 2)},
        {"combo": LORA, "label": COMBOS[1]["label"], "reference": False, "questions": 9,
         "criteria": {
             "personality": stat(5.67, 5.33, 5.89, 9, diff={
                 "mean": 3.33, "lo": 2.67, "hi": 4.0, "p": 0.0039, "n": 9}),
             "memorization": stat(5.12, 4.80, 5.41, 8, missing=1, diff={
                 "mean": 0.31, "lo": -0.05, "hi": 0.66, "p": 0.0812, "n": 8}),
             "hallucination": stat(5.56, 4.78, 6.22, 9, diff={
                 "mean": 2.33, "lo": 1.44, "hi": 3.22, "p": 0.0117, "n": 9})},
         "pairwise": pairwise_of(LORA), "style": style[LORA], "facts": wilson(0, 2)},
        {"combo": RAG, "label": COMBOS[2]["label"], "reference": False, "questions": 9,
         "criteria": {
             "personality": stat(5.88, 5.5, 6.25, 8, missing=1, diff={
                 "mean": 3.5, "lo": 2.75, "hi": 4.25, "p": 0.0078, "n": 8}),
             "memorization": stat(5.88, 5.25, 6.5, 8, missing=1, diff={
                 "mean": 3.5, "lo": 2.63, "hi": 4.38, "p": 0.0078, "n": 8}),
             "hallucination": stat(6.25, 5.75, 6.75, 8, missing=1, diff={
                 "mean": 3.0, "lo": 2.0, "hi": 4.0, "p": 0.0117, "n": 8})},
         "pairwise": pairwise_of(RAG), "style": style[RAG], "facts": wilson(2, 2)},
    ]
    headline[1]["pairwise"]["personality"] = {
        "win": {"rate": 0.45, "lo": 0.35, "hi": 0.557, "k": 18, "n": 40},
        "tie": {"rate": 0.20, "lo": 0.105, "hi": 0.348, "k": 8, "n": 40},
        "loss": {"rate": 0.35, "lo": 0.222, "hi": 0.504, "k": 14, "n": 40}, "n": 40}
    return {
        "meta": {"name": "ayane-eval", "persona": "小野寺絢音",
                 "judge": {"name": "gpt-4o-mini", "model": "gpt-4o-mini-2024-07-18"},
                 "created": "2025-11-29T15:30:00+00:00", "reference": REFERENCE, "seed": 7,
                 "samples": 1, "confidence": 0.95},
        "combos": COMBOS, "criteria": CRITERIA, "sets": ["heldout", "probes", "scripts"],
        "headline": headline, "distributions": dists, "questions": questions}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path]:
    return write_report(make_results(), tmp_path_factory.mktemp("eval") / "ayane-eval")


def _table_rows(md: str, heading: str) -> list[list[str]]:
    """The cells of the first table after `heading` (header and rule skipped)."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


# -- report.md -----------------------------------------------------------------------------

def test_write_report_writes_both_files_atomically(tmp_path):
    folder = tmp_path / "evals" / "run"
    md_path, html_path = write_report(make_results(), folder)
    assert (md_path, html_path) == (folder / "report.md", folder / "report.html")
    first = html_path.read_text(encoding="utf-8")
    results = make_results()
    results["meta"]["name"] = "renamed"
    write_report(results, folder)  # a rerun replaces both
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "report.md"]
    assert html_path.read_text(encoding="utf-8") != first
    assert md_path.read_text(encoding="utf-8").startswith("# Evaluation report — renamed")


def test_markdown_meta_and_headline_figures(written):
    md = written[0].read_text(encoding="utf-8")
    for line in ("- persona: 小野寺絢音", "- judge: gpt-4o-mini (model gpt-4o-mini-2024-07-18)",
                 "- date: 2025-11-29 15:30 UTC", "- reference: gemma-3-270m · RAG off "
                 "(gemma-3-270m)", "- seed: 7", "- samples per question: 1"):
        assert line in md
    rows = _table_rows(md, "## Headline")
    assert len(rows) == len(COMBOS) * len(CRITERIA)
    by_key, combo = {}, None
    for row in rows:
        combo = row[0] or combo
        by_key[(combo, row[1])] = row
    ref = by_key[("**gemma-3-270m · RAG off** (reference)", "Personality")]
    assert ref[3:5] == ["2.33 [1.67, 3.00]", "reference"]
    memo = by_key[("ayane-270m-lora · RAG off", "Memorization")]
    assert memo[2] == "uncalibrated"  # the calibration beside the figures
    assert memo[3:7] == ["5.12 [4.80, 5.41]", "+0.31 [-0.05, +0.66]", "p=0.081",
                         "8 (1 missing)"]
    person = by_key[("ayane-270m-lora · RAG off", "Personality")]
    assert person[2] == "calibrated ρ=0.71 (n=40)"
    assert person[5] == "p=0.004"
    assert person[7] == "win 45% [35, 56] · tie 20% [10, 35] · loss 35% [22, 50] (n=40)"
    assert by_key[("ayane-270m-lora · RAG off", "Hallucination")][2] == \
        "calibrated ρ=0.58 (n=40)"

    style = {row[0]: row for row in _table_rows(md, "### Style and facts")}
    lora = style["ayane-270m-lora · RAG off"]
    assert lora[1:3] == ["9", "82% [74, 88]"]
    assert lora[-2:] == ["13", "0% [0, 66]"]
    assert style["ayane-270m-lora · RAG on"][-1] == "100% [34, 100]"


def test_markdown_per_question_table_lab_question_first_and_missing_as_dash(written):
    md = written[0].read_text(encoding="utf-8")
    rows = _table_rows(md, "## Per question")
    assert [r[2] for r in rows] == [q[1] for q in QUESTIONS]
    first = rows[0]
    assert first[3] == LAB_QUESTION
    assert "小野寺絢音と申しますわ。" in first[6]  # every combination's reply on that row
    assert "わたくし、小野寺絢音ですわ。" in first[7]
    assert "大規模言語モデルです。<br>何かお手伝い" in first[5]
    food = rows[1]
    assert "Memorization — · Hallucination 5" in food[6]  # a failed verdict: —, never 0
    assert "Memorization 0" not in md
    assert "\\<script\\>alert(1)\\</script\\>" in food[6]  # inert in a Markdown viewer
    broken = rows[2][7]
    assert broken.startswith("*missing — broken reply: worker died: CUDA out of memory*")
    assert "Personality — · Memorization — · Hallucination —" in broken
    script = rows[7]
    assert script[3].startswith("1. こんにちは。<br>2. 今日は何をしていましたか?")
    assert "stopped: length" in rows[5][7]


def test_empty_results_do_not_break_the_report(tmp_path):
    results = {"meta": {"name": "empty", "reference": REFERENCE}, "combos": [],
               "criteria": [], "sets": [], "headline": [], "distributions": {},
               "questions": []}
    md_path, html_path = write_report(results, tmp_path)
    assert "# Evaluation report — empty" in md_path.read_text(encoding="utf-8")
    assert html_path.read_text(encoding="utf-8").count("<svg") == 4


# -- report.html ---------------------------------------------------------------------------

def test_html_is_self_contained_and_escaped(written):
    page = written[1].read_text(encoding="utf-8")
    assert re.search(r"https?:", page, re.I) is None  # not even an XML namespace
    # The only references are to the page's own ids (the plots' clip paths and markers).
    refs = re.findall(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?)([^"'\s)>]*)""", page, re.I)
    assert refs and all(ref.startswith("#") for ref in refs), sorted(set(refs))[:5]
    assert re.search(r"@import|<link\b|<iframe|<object|<embed|\bsrc\s*=", page, re.I) is None
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;マカロン" in page
    assert page.count("<script") == 1  # the page's own filter/sort script
    assert page.count("<svg") == 4
    rows = re.findall(r'<tr data-set="([^"]+)" data-index="(\d+)" '
                      r'data-disagreement="([\d.]+)">', page)
    assert [r[0] for r in rows] == [q[0] for q in QUESTIONS]
    assert float(rows[0][2]) == pytest.approx(7.0 - 2.0)  # the lab question: 7.00 vs 2.00
    assert 'data-filter="probes"' in page and 'data-sort="disagreement"' in page
    assert "calibrated ρ=0.71 (n=40)" in page and "uncalibrated" in page
    assert "5.12 [4.80, 5.41]" in page and "+0.31 [-0.05, +0.66]" in page
    assert "missing — broken reply: worker died: CUDA out of memory" in page
    assert 'class="chip missing" title="Memorization">Memorization <b>—</b>' in page
    assert "lab question" in page


def test_importing_the_report_is_cheap():
    code = ("import sys; import pipelines.evaluation.report; "
            "heavy = [m for m in ('matplotlib', 'torch', 'textual') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2],
                   timeout=120)


def test_plots_keep_text_as_text():
    plots = report.render_plots(make_results())
    assert [key for key, _, _ in plots] == ["means", "pairwise", "distributions", "style"]
    for _, _, svg in plots:
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
        assert "<text" in svg and "<metadata" not in svg
    assert "ayane-270m-lora · RAG on" in plots[0][2]


# -- in a real browser ---------------------------------------------------------------------
#
# Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: no
# port, no library): the page's own requests are the Network events of its tab. Chromium
# itself (its component updater, its account service) connects out whatever the flags say,
# so "nothing reached the proxy" cannot be asked of the browser; the proxy is a dead end all
# the same, and no host name resolves, so nothing leaves the machine.

def _chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail("chromium is not installed, and CI must run the report's browser test: "
                    ".ci/run installs Debian's chromium with apt-get; see its output")
    pytest.skip("chromium is not installed (apt-get install chromium): the report's "
                "browser test needs it")


class _Trap:
    """A listening socket that accepts and records what connects: the browser's proxy."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    self.requests.append(conn.recv(300))
                except OSError:
                    self.requests.append(b"")

    def saw(self, host: str, wait_s: float = 5.0) -> bool:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if any(host.encode() in r for r in self.requests):
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


_PLACE_FDS = """import os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w)
os.execvp(sys.argv[3], sys.argv[3:])"""


class _Tab:
    """One headless Chromium with one tab, over the DevTools pipe (fd 3 in, fd 4 out)."""

    def __init__(self, binary: str, profile: Path, proxy_port: int) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        # The child's ends go to fd 3 and 4: moved above both first (so that neither pipe end
        # already sits on 3 or 4), then placed by a small Python that execs chromium (no
        # preexec_fn: this process has threads).
        high_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 100)
        high_w = fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 100)
        os.close(cmd_r)
        os.close(out_w)
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--disable-default-apps",
                 f"--user-data-dir={profile}",
                 f"--proxy-server=http://127.0.0.1:{proxy_port}",
                 "--proxy-bypass-list=<-loopback>",
                 # every name unresolvable but the proxy's own address
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--window-size=1280,2000", "--remote-debugging-pipe"]
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PLACE_FDS, str(high_r), str(high_w), binary, *flags],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(high_r, high_w))
        os.close(high_r)
        os.close(high_w)
        self._messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Network.enable", "Page.enable"):
            self.call(method, session=True)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 2000, "deviceScaleFactor": 1, "mobile": False},
                  session=True)

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._out_r, 1 << 16):
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def _get(self, deadline: float) -> dict:
        try:
            message = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"chromium did not answer; its log: {self.log}") from None
        if message is None:
            raise AssertionError(f"chromium exited; its log: {self.log}")
        return message

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        self._next_id += 1
        request = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            request["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(request).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            message = self._get(deadline)
            if message.get("id") == self._next_id:
                assert "error" not in message, message
                return message["result"]
            self.events.append(message)

    def open(self, url: str) -> None:
        """Navigate and wait for the load event, then a moment for late requests."""
        seen = len(self.events)
        self.call("Page.navigate", {"url": url}, session=True)
        deadline = time.monotonic() + 30
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events[seen:]):
            self.events.append(self._get(deadline))
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            with contextlib.suppress(queue.Empty):
                message = self._messages.get(timeout=0.05)
                if message is not None:
                    self.events.append(message)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True}, session=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def dialogs(self) -> list[dict]:
        return [e for e in self.events if e.get("method") == "Page.javascriptDialogOpening"]

    def screenshot(self) -> bytes:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)


@pytest.fixture(scope="module")
def trap():
    trap = _Trap()
    yield trap
    trap.close()


@pytest.fixture
def tab(trap, tmp_path):
    binary = _chromium_binary()
    tab = _Tab(binary, tmp_path / "profile", trap.port)
    yield tab
    tab.close()


def _remote(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(("file:", "about:"))]


def test_browser_draws_the_report_without_asking_the_network(tab, written):
    tab.open(written[1].as_uri())
    assert [u for u in tab.requested()] == [written[1].as_uri()]  # the page itself, only
    assert tab.dialogs() == []  # the reply's <script>alert(1)</script> stayed text
    assert tab.js("document.querySelectorAll('table.headline tbody tr').length") == 9
    headline = tab.js("document.querySelector('table.headline').innerText")
    assert "5.12 [4.80, 5.41]" in headline and "calibrated ρ=0.71 (n=40)" in headline
    drawn = tab.js("Array.from(document.querySelectorAll('figure svg'))"
                   ".map(s => [s.getBoundingClientRect().width, s.getBoundingClientRect().height,"
                   " s.querySelectorAll('text').length])")
    assert len(drawn) == 4
    assert all(w > 300 and h > 80 and texts > 5 for w, h, texts in drawn), drawn
    first = tab.js("document.querySelector('#q-rows tr').innerText")
    assert LAB_QUESTION in first and "小野寺絢音と申しますわ。" in first
    assert "<script>alert(1)</script>マカロン" in tab.js(
        "document.querySelector('#q-rows').innerText")

    from PIL import Image  # matplotlib's own dependency

    with Image.open(io.BytesIO(tab.screenshot())) as image:
        pixels = image.convert("RGB")
        assert pixels.size == (1280, 2000)
        colours = pixels.getcolors(maxcolors=1 << 24)
    assert len(colours) > 50, "the screenshot is (nearly) one colour"
    white = sum(n for n, rgb in colours if min(rgb) >= 250)
    assert white < 0.97 * 1280 * 2000, "the screenshot is (nearly) blank"


def test_browser_filters_and_sorts_the_questions(tab, written):
    tab.open(written[1].as_uri())
    rows = ("Array.from(document.querySelectorAll('#q-rows tr'))"
            ".map(r => [r.dataset.set, Number(r.dataset.disagreement), r.hidden,"
            " r.getBoundingClientRect().height > 0])")
    before = tab.js(rows)
    assert [r[0] for r in before] == [q[0] for q in QUESTIONS] and not any(r[2] for r in before)

    tab.js("document.querySelector('[data-filter=\"probes\"]').click()")
    shown = [r for r in tab.js(rows) if not r[2]]
    assert [r[0] for r in shown] == ["probes"] * 3 and all(r[3] for r in shown)
    assert tab.js("document.getElementById('q-count').textContent") == "3 of 9 questions"

    tab.js("document.querySelector('[data-sort=\"disagreement\"]').click()")
    after = tab.js(rows)
    spread = [r[1] for r in after]
    assert spread == sorted(spread, reverse=True) and spread[0] > spread[-1]
    assert [r[0] for r in after if not r[2]] == ["probes"] * 3
    assert tab.js("location.hash") == "#set=probes&sort=disagreement"

    tab.js("document.querySelector('[data-sort=\"order\"]').click()")
    tab.js("document.querySelector('[data-filter=\"all\"]').click()")
    assert [r[:3] for r in tab.js(rows)] == [r[:3] for r in before]

    # a view linked by its address opens as it was left
    tab.open("about:blank")  # (a new fragment alone would not load the page again)
    tab.open(written[1].as_uri() + "#set=scripts&sort=disagreement")
    assert [r[0] for r in tab.js(rows) if not r[2]] == ["scripts", "scripts"]
    assert _remote(tab.requested()) == []


def test_the_browser_check_sees_a_page_that_asks_the_network(tab, trap, tmp_path):
    """The control: a page loading a remote image is seen, in the tab's requests and at the
    proxy, so the empty lists above mean the report asked for nothing."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><img src="http://example.invalid/x.png">', "utf-8")
    tab.open(page.as_uri())
    assert _remote(tab.requested()) == ["http://example.invalid/x.png"]
    assert trap.saw("example.invalid")
