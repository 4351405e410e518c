"""GGUF export of the embedded Gemma 3 270M: time and peak memory per stage (prepare,
convert f16, quantise Q8_0 / Q4_K_M, verify f16), then decode tokens/s of f16, Q8_0 and
Q4_K_M printed as ratios to f16.

The HF source is the packaged Q4_K_M GGUF dequantised to fp32 (<home>/models/gemma-3-270m-hf,
made first if missing). Peak memory: the highest RSS of this process plus its children,
sampled every 50 ms.

    .venv/bin/python bench/export.py [--home ~/.local/share/kyara]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil


class Peak:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> Peak:
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.started


def decode_tps(path: Path, n: int = 64) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    ids = llm.tokenize("<start_of_turn>user\n紅茶は好き？<end_of_turn>\n<start_of_turn>model\n"
                       .encode(), add_bos=True, special=True)
    llm.eval(ids)
    started, count = time.perf_counter(), 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=False):
        count += 1
        if count >= n:
            break
    seconds = time.perf_counter() - started
    llm.close()
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", default=str(Path("~/.local/share/kyara").expanduser()))
    args = parser.parse_args()
    home = Path(args.home)

    from pipelines.export.convert import convert_hf, quantize, stage_hf_dir
    from pipelines.export.tools import converter_dir
    from pipelines.export.verify import generation_required, persona_texts, verify_gguf
    from pipelines.inference.dequantize import dequantize_gguf
    from pipelines.inference.embedded import ensure_embedded
    from pipelines.workspace import Workspace

    gguf = ensure_embedded("gemma3-270m", home)
    hf = dequantize_gguf(gguf, home / "models" / "gemma-3-270m-hf")
    tools = converter_dir(home, say=print)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kyara-bench-export-") as folder:
        tmp = Path(folder)
        with Peak() as p:
            list(stage_hf_dir(hf, tmp / "hf"))
        rows.append(("prepare", p))
        f16 = tmp / "f16.gguf"
        with Peak() as p:
            list(convert_hf(tools, tmp / "hf", f16, "f16"))
        rows.append(("convert f16", p))
        files = {"f16": f16}
        for q in ("Q8_0", "Q4_K_M"):
            files[q] = tmp / f"{q}.gguf"
            with Peak() as p:
                quantize(f16, files[q], q, threads=2)
            rows.append((f"quantise {q}", p))
        with Peak() as p:
            ws = Workspace.load()
            sentences, questions = persona_texts(ws.persona_dir("ayane"))
            check = verify_gguf(f16, hf, sentences=sentences, questions=questions,
                                system=ws.persona("ayane").prompts.system, kind="f16",
                                require_generation=generation_required("f16"), n_threads=2)
        rows.append(("verify f16", p))
        print("\n".join(check.lines()))
        print(f"\n{'stage':<18}{'seconds':>9}{'peak RSS GiB':>14}")
        for name, p in rows:
            print(f"{name:<18}{p.seconds:>9.1f}{p.peak / 2**30:>14.2f}")
        tps = {k: decode_tps(v) for k, v in files.items()}
        print(f"\n{'file':<8}{'MiB':>8}{'tok/s':>8}{'x f16':>8}")
        for k, v in files.items():
            print(f"{k:<8}{v.stat().st_size / 2**20:>8.0f}{tps[k]:>8.1f}{tps[k] / tps['f16']:>8.2f}")


if __name__ == "__main__":
    main()
