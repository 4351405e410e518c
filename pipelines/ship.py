"""Build the Ayane adapter that ships with kyara (`make ayane-adapter`), so the default
console answers as Ayane on a fresh machine without training first.

    python -m pipelines.ship [--home DIR] [--run-dir DIR] [--out DIR] [--force]

1. the CPU quick-start train job (configs/jobs/quickstart-ayane-270m.yaml, fixed seed) in
   its own kyara home, unless the run directory already holds a finished run;
2. its PEFT adapter exported as a GGUF LoRA adapter against the packaged Gemma 3 270M
   Q4_K_M GGUF with llama.cpp's converter, verified there against transformers + PEFT;
3. the persona's eval questions answered greedily by the GGUF base and by base + adapter
   (the variant the console runs), measured with the same style figures as training;
4. `adapter.gguf` and `provenance.yaml` (job config, data hashes, seed, versions, the
   train job's mini-evaluation, the GGUF figures, the verification) written into --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "configs" / "jobs" / "quickstart-ayane-270m.yaml"
OUT = REPO / "configs" / "models" / "ayane-270m"
VARIANT = "ayane-270m"
BASE_VARIANT = "gemma3-270m"
HF_BASE = "models/gemma-3-270m-hf"  # where the quick-start dequantises the GGUF (home-relative)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finished_run(run_dir: Path) -> dict[str, Any] | None:
    """The `done` summary of a finished run in run_dir (its last event), else None."""
    from pipelines.events import EVENTS_FILE, last_event

    event = last_event(run_dir / EVENTS_FILE)
    return (event.summary or {}) if event is not None and event.type == "done" else None


def train(home: Path, run_dir: Path) -> dict[str, Any]:
    done = finished_run(run_dir)
    if done is not None:
        print(f"using the finished run in {run_dir}", flush=True)
        return done
    print(f"training: {JOB.name} into {run_dir} (about 10 minutes on 2 CPU cores)", flush=True)
    env = {**os.environ, "KYARA_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "pipelines", "run", str(JOB), "--run-dir",
                    str(run_dir)], check=True, env=env, cwd=REPO)
    done = finished_run(run_dir)
    if done is None:
        raise SystemExit(f"the train job ended without a done event: see {run_dir}")
    return done


def gguf_figures(home: Path, adapter: Path | None, max_new_tokens: int
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Style figures of the GGUF base (adapter None) or base + adapter over the persona's
    eval questions, greedy, through the chat engine's gguf backend."""
    from pipelines.evaluation import figures, replies_from_backend
    from pipelines.inference.registry import load_backend
    from pipelines.workspace import Workspace

    ws = Workspace.load(REPO / "configs")
    persona = ws.persona("ayane")
    questions = [q.question for q in ws.persona_data("ayane").eval]
    variant = ws.variant(BASE_VARIANT)
    name = BASE_VARIANT
    if adapter is not None:
        variant = variant.model_copy(update={"name": VARIANT, "lora_path": str(adapter)})
        name = VARIANT
    backend = load_backend(variant, home)
    try:
        replies = replies_from_backend(backend, persona.prompts.system, questions,
                                       max_new_tokens)
    finally:
        backend.close()
    return figures(name, replies, persona.speech).to_dict(), [asdict(r) for r in replies]


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "peft", "trl", "llama_cpp_python", "gguf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=REPO / "build" / "ship-home",
                    help="the kyara home the quick-start trains in (not your own)")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="the train run (default: HOME/runs/quickstart-ship)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--force", action="store_true", help="replace an adapter already there")
    args = ap.parse_args(argv)
    home = args.home.resolve()
    run_dir = (args.run_dir or home / "runs" / "quickstart-ship").resolve()
    out = args.out.resolve()
    target = out / "adapter.gguf"
    if target.exists() and not args.force:
        raise SystemExit(f"{target} exists: pass --force to build it again")

    job = yaml.safe_load(JOB.read_text(encoding="utf-8"))
    started = time.time()
    done = train(home, run_dir)
    adapter_dir = Path(done.get("adapter") or run_dir / "adapter")

    from pipelines.export.api import export_lora_adapter
    from pipelines.inference.embedded import ensure_embedded

    base_gguf = ensure_embedded(BASE_VARIANT, home)
    built = out / f".adapter.gguf.{os.getpid()}.new"
    path, check = export_lora_adapter(adapter_dir, home / HF_BASE, built, base_gguf=base_gguf,
                                      home=home, outtype="f16", force=True)
    try:
        max_new = int(job.get("eval_max_new_tokens", 48))
        base_figs, base_replies = gguf_figures(home, None, max_new)
        ayane_figs, ayane_replies = gguf_figures(home, path, max_new)
        persona_dir = REPO / "configs" / "personas" / "ayane"
        provenance = {
            "variant": VARIANT,
            "adapter": {"file": target.name, "sha256": sha256(path),
                        "bytes": path.stat().st_size, "type": "GGUF LoRA adapter, f16"},
            "base": {"variant": BASE_VARIANT, "file": base_gguf.name,
                     "sha256": sha256(base_gguf)},
            "job": {"file": str(JOB.relative_to(REPO)), "config": job},
            "seed": job.get("seed"),
            "data": {name: sha256(persona_dir / name)
                     for name in ("persona.yaml", "dialogues.jsonl", "eval.jsonl")},
            "train": {k: done.get(k) for k in ("seconds", "eval_loss", "prep")
                      if k in done},
            "mini_eval_hf": (done.get("mini_eval") or {}),
            "gguf_eval": {"greedy_max_new_tokens": max_new, "before": base_figs,
                          "after": ayane_figs},
            "verification": check.summary() if check is not None else None,
            "versions": versions(),
            "built": time.strftime("%Y-%m-%d", time.gmtime(started)),
        }
        (out / "replies.jsonl").write_text(
            "".join(json.dumps({"question": b["question"], "base": b["text"],
                                "ayane": a["text"], "ayane_stop": a["stop"]},
                               ensure_ascii=False) + "\n"
                    for b, a in zip(base_replies, ayane_replies, strict=True)),
            encoding="utf-8")
        (out / "provenance.yaml").write_text(
            "# How adapter.gguf was made: python -m pipelines.ship (make ayane-adapter)\n"
            + yaml.safe_dump(provenance, allow_unicode=True, sort_keys=False), encoding="utf-8")
        os.replace(path, target)
    finally:
        built.unlink(missing_ok=True)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) and provenance.yaml")
    print(f"GGUF eval, base -> {VARIANT}: "
          + ", ".join(f"{k} {base_figs[k]:.2f} -> {ayane_figs[k]:.2f}"
                      for k in ("ends_maru", "ojousama", "median_chars", "stop_eos")))


if __name__ == "__main__":
    main()
