"""Build the Ayane adapters that ship with kyara (`make ayane-adapter`), so the default
console answers as Ayane on a fresh machine without training first.

    python -m pipelines.ship [--variant NAME] [--home DIR] [--run-dir DIR] [--out DIR]
                             [--force]

`--variant ayane-270m` (the default variant of the console) is the CPU quick-start;
`--variant ayane-270m-rag` the same trained on both of chat's prompts, half of them with
the facts retrieval finds (for chats with RAG on; issue 17). Each is:

1. its CPU train job (configs/jobs/quickstart-ayane-270m[-rag].yaml, fixed seed) in the
   ship's own kyara home, unless the run directory already holds a finished run;
2. the export job on that run's variant (`lora_only`, `base_gguf: gemma3-270m`): its PEFT
   adapter as a GGUF LoRA adapter with llama.cpp's converter, verified on the packaged
   Gemma 3 270M Q4_K_M GGUF against transformers + PEFT;
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
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipelines.files import rename
from pipelines.home import Home
from pipelines.processes import child_env, python

REPO = Path(__file__).resolve().parents[1]
BASE_VARIANT = "gemma3-270m"


@dataclass(frozen=True)
class Shipped:
    """One adapter that ships: the variant the console lists, the job that trains it."""

    variant: str
    job: Path

    @property
    def out(self) -> Path:
        """Where it ships: configs/models/<variant>/ beside <variant>.yaml."""
        return REPO / "configs" / "models" / self.variant

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.job.read_text(encoding="utf-8"))

    @property
    def trained(self) -> str:
        """The variant the train job registers in the ship's home."""
        cfg = self.config
        return cfg.get("variant") or cfg["name"]


SHIPPED = {s.variant: s for s in (
    Shipped("ayane-270m", REPO / "configs" / "jobs" / "quickstart-ayane-270m.yaml"),
    Shipped("ayane-270m-rag", REPO / "configs" / "jobs" / "quickstart-ayane-270m-rag.yaml"))}
DEFAULT = SHIPPED["ayane-270m"]


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


def run_job(job: Path, home: Path, run_dir: Path) -> dict[str, Any]:
    """One job through the job runner (`python -m pipelines run`, as the console starts
    them), in the ship's own home; its `done` summary."""
    env = {**child_env(), "KYARA_HOME": str(home)}
    subprocess.run(python("-m", "pipelines", "run", str(job), "--run-dir", str(run_dir),
                          "--configs", str(REPO / "configs")), check=True, env=env, cwd=REPO)
    done = finished_run(run_dir)
    if done is None:
        raise SystemExit(f"the {job.stem} job ended without a done event: see {run_dir}")
    return done


def train(ship: Shipped, home: Path, run_dir: Path) -> dict[str, Any]:
    done = finished_run(run_dir)
    if done is not None:
        print(f"using the finished run in {run_dir}", flush=True)
        return done
    print(f"training: {ship.job.name} into {run_dir} (10-15 minutes on 2 CPU cores)",
          flush=True)
    return run_job(ship.job, home, run_dir)


def export_job(ship: Shipped, home: Path, variant: str) -> dict[str, Any]:
    """The export job's config: the hf variant's adapter as a GGUF LoRA on the packaged
    Q4_K_M base, verified there, into the ship home."""
    return {"job": "export", "name": ship.variant, "variant": variant, "outtype": "f16",
            "lora_only": True, "base_gguf": BASE_VARIANT,
            "output": str(Home(home).exports / ship.variant), "force": True}


def peft_variant(ship: Shipped, home: Path, adapter_dir: Path) -> str:
    """An hf variant in the ship home for exactly this adapter: the trained variant's
    base model (what the train job registered) with `adapter_dir`."""
    trained = Home(home).models / f"{ship.trained}.yaml"
    if not trained.is_file():
        raise SystemExit(f"{trained}: {ship.job.name} did not register {ship.trained} in "
                         f"{home}")
    data = yaml.safe_load(trained.read_text(encoding="utf-8"))
    name = f"{ship.variant}-peft"
    data.update(name=name, adapter=str(adapter_dir),
                description=f"the PEFT adapter make ayane-adapter exports ({adapter_dir})")
    (Home(home).models / f"{name}.yaml").write_text(
        yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return name


def export(ship: Shipped, home: Path, adapter_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The export job run on the adapter: (the GGUF LoRA file, its verification)."""
    job = Home(home).jobs / f"export-{ship.variant}.yaml"
    job.parent.mkdir(parents=True, exist_ok=True)
    cfg = export_job(ship, home, peft_variant(ship, home, adapter_dir))
    job.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    run_dir = Home(home).runs / f"export-{ship.variant}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"exporting: {job.name} into {run_dir}", flush=True)
    done = run_job(job, home, run_dir)
    (lora,) = [Path(done["output"]) / name for name in done["files"]]
    (check,) = done["verification"].values()
    return lora, check


def gguf_figures(home: Path, adapter: Path | None, max_new_tokens: int, name: str
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Style figures of the GGUF base (adapter None) or base + adapter, named `name`, over
    the persona's eval questions, greedy, through the chat engine's gguf backend."""
    from pipelines.evaluation import figures, replies_from_backend
    from pipelines.inference.registry import load_backend
    from pipelines.workspace import Workspace

    ws = Workspace.load(REPO / "configs")
    persona = ws.persona("ayane")
    questions = [q.question for q in ws.persona_data("ayane").eval]
    variant = ws.variant(BASE_VARIANT)
    if adapter is not None:
        variant = variant.model_copy(update={"name": name, "lora_path": str(adapter)})
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
    ap.add_argument("--variant", choices=sorted(SHIPPED), default=DEFAULT.variant,
                    help="which shipped adapter to build (default: %(default)s)")
    ap.add_argument("--home", type=Path, default=REPO / "build" / "ship-home",
                    help="the kyara home the train job runs in (not your own)")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="the train run (default: HOME/runs/<variant>-ship)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where it is written (default: configs/models/<variant>)")
    ap.add_argument("--force", action="store_true", help="replace an adapter already there")
    args = ap.parse_args(argv)
    ship = SHIPPED[args.variant]
    home = args.home.resolve()
    run_dir = (args.run_dir or Home(home).runs / f"{ship.variant}-ship").resolve()
    out = (args.out or ship.out).resolve()
    target = out / "adapter.gguf"
    if target.exists() and not args.force:
        raise SystemExit(f"{target} exists: pass --force to build it again")

    job = ship.config
    started = time.time()
    done = train(ship, home, run_dir)
    adapter_dir = Path(done.get("adapter") or run_dir / "adapter")

    from pipelines.inference.embedded import ensure_embedded

    if not (adapter_dir / "adapter_config.json").is_file():
        raise SystemExit(f"{adapter_dir}: the train run left no PEFT adapter")
    base_gguf = ensure_embedded(BASE_VARIANT, home)
    lora, check = export(ship, home, adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    built = out / f".adapter.gguf.{os.getpid()}.new"
    shutil.copyfile(lora, built)
    path = built
    try:
        max_new = int(job.get("eval_max_new_tokens", 48))
        base_figs, base_replies = gguf_figures(home, None, max_new, BASE_VARIANT)
        ayane_figs, ayane_replies = gguf_figures(home, path, max_new, ship.variant)
        persona_dir = REPO / "configs" / "personas" / "ayane"
        provenance = {
            "variant": ship.variant,
            "adapter": {"file": target.name, "sha256": sha256(path),
                        "bytes": path.stat().st_size, "type": "GGUF LoRA adapter, f16"},
            "base": {"variant": BASE_VARIANT, "file": base_gguf.name,
                     "sha256": sha256(base_gguf)},
            "job": {"file": str(ship.job.relative_to(REPO)), "config": job},
            "seed": job.get("seed"),
            # the facts too when the job trains on the retrieval prompt (rag_share)
            "data": {name: sha256(persona_dir / name)
                     for name in ("persona.yaml", "dialogues.jsonl", "eval.jsonl")
                     + (("knowledge.jsonl",) if job.get("rag_share") else ())},
            "train": {k: done.get(k) for k in ("seconds", "eval_loss", "prep")
                      if k in done},
            "mini_eval_hf": (done.get("mini_eval") or {}),
            "gguf_eval": {"greedy_max_new_tokens": max_new, "before": base_figs,
                          "after": ayane_figs},
            "verification": check,
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
        rename(path, target)
    finally:
        built.unlink(missing_ok=True)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) and provenance.yaml")
    print(f"GGUF eval, base -> {ship.variant}: "
          + ", ".join(f"{k} {base_figs[k]:.2f} -> {ayane_figs[k]:.2f}"
                      for k in ("ends_maru", "ojousama", "median_chars", "stop_eos")))


if __name__ == "__main__":
    main()
