"""In-memory merging: each candidate merge configuration is computed tensor by tensor
straight into ONE resident model, with no disk write, no second model and no reload.

- Sources stay on the host, memory-mapped: `safetensors.safe_open` keeps each shard mapped
  and `get_tensor` copies out only the tensor asked for, so the anonymous memory a merge
  needs is one output tensor's inputs, never a whole source model.
- The math is mergekit's own: its MergePlanner resolves the configuration (per-model and
  per-layer parameters, gradients, filters, base model) into one ExecuteMergeMethodTask per
  output tensor, and each task is executed here on tensors this module loads. Only the
  tensor loading and the write into the resident parameter are kyara's; the merged values
  equal those of a `run_merge` of the same configuration (dare's random masks aside: they
  depend on the order tensors are drawn in).
- The configuration asks for `dtype: float32` (see pipelines/merge/evolve.py): inputs are
  cast to fp32 per tensor, merged in fp32, and copied into the resident parameter in its
  own dtype (`copy_` casts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.plan.model import safetensors_header
from pipelines.plan.units import MERGE_CHUNK_ELEMENTS

Progress = Callable[[int, int], None]
# Methods whose result at an element depends only on the inputs at that element (and on
# per-tensor parameters): merged in row chunks, so the transient memory is a chunk's
# inputs, not a whole embedding matrix's. ties / dare_ties rank magnitudes over the whole
# tensor and are merged whole.
ELEMENTWISE = frozenset({"linear", "task_arithmetic"})
SPARSE = frozenset({"ties", "dare_ties"})  # big tensors: two passes (see _sparse_into)


def return_freed_memory() -> bool:
    """Ask glibc to serve blocks of 128 KiB and more with mmap, so a merge's freed
    per-tensor buffers go back to the system at once. Its default threshold grows with
    each freed block (up to 32 MiB), after which the buffers are carved from the heap and
    kept: measured here, that alone added ~0.4 x a model's size to the peak anonymous RSS
    of a CPU evolve (bench/evolve_memory.py). False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))
    except (OSError, AttributeError):
        return False


def _crc(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode("utf-8"))


class SourceIndex:
    """Tensor name -> (shard, open memory-mapped handle) for one model folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"model '{self.folder}': no .safetensors files (an in-memory "
                              "merge reads safetensors only)")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            for name, info in safetensors_header(file).items():
                if name == "__metadata__":
                    continue
                self.shapes[name] = tuple(int(d) for d in info["shape"])
                self.dtypes[name] = info["dtype"]
                self._file_of[name] = file
        self._handles: dict[Path, Any] = {}

    def has(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        file = self._file_of[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return handle

    def get(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        """One tensor, or rows [a, b) of it, copied out of the mapping (the rest of the
        file stays unread)."""
        if rows is None:
            return self._handle(name).get_tensor(name)
        return self._handle(name).get_slice(name)[rows[0]:rows[1]]

    def close(self) -> None:
        self._handles.clear()


def architecture(folder: Path) -> str:
    path = folder / "config.json"
    if not path.is_file():
        return "?"
    data = json.loads(path.read_text(encoding="utf-8"))
    return ",".join(data.get("architectures") or [data.get("model_type", "?")])


def check_compatible(indexes: dict[str, SourceIndex]) -> None:
    """One architecture, the same tensor names and shapes: a one-line ConfigError otherwise."""
    items = list(indexes.items())
    first_ref, first = items[0]
    arch = architecture(first.folder)
    for ref, index in items[1:]:
        other = architecture(index.folder)
        if other != arch:
            raise ConfigError(f"models: '{ref}' is {other} but '{first_ref}' is {arch}; "
                              "an evolve merge needs one architecture")
        missing = sorted(set(first.shapes) ^ set(index.shapes))
        if missing:
            raise ConfigError(f"models: '{ref}' and '{first_ref}' have different tensors "
                              f"(e.g. {missing[0]}); mismatched architectures")
        for name, shape in first.shapes.items():
            if index.shapes[name] != shape:
                raise ConfigError(f"models: tensor {name} is {list(index.shapes[name])} in "
                                  f"'{ref}' but {list(shape)} in '{first_ref}'; mismatched "
                                  "architectures")


class InMemoryMerger:
    """Merges candidate configurations into `model` (a transformers model, already on its
    device), in place.

        merger = InMemoryMerger(model, {path: SourceIndex(path), ...}, device="cuda")
        merger.apply(config)          # a validated mergekit MergeConfiguration
    """

    def __init__(self, model: Any, sources: dict[str, SourceIndex], device: str = "cpu"
                 ) -> None:
        self.model = model
        self.sources = {str(Path(k).resolve()): v for k, v in sources.items()}
        return_freed_memory()
        self.device = device
        # state_dict(keep_vars=True): tied weights appear under both names, same Parameter
        self.targets = dict(model.state_dict(keep_vars=True))
        self._arch: Any = None
        self._out_config: Any = None

    def _planned(self, config: Any) -> list[tuple[Any, Any]]:
        from mergekit.architecture import get_architecture_info
        from mergekit.merge import _model_out_config
        from mergekit.options import MergeOptions as MKOptions
        from mergekit.plan import MergePlanner

        options = MKOptions(device=self.device, quiet=True)
        if self._arch is None:  # the same architecture for every candidate
            self._arch = get_architecture_info(config, options)
            self._out_config = _model_out_config(config, self._arch)
        planner = MergePlanner(config, self._arch, options=options,
                               out_model_config=self._out_config)
        planner._plan()  # the per-tensor tasks of plan_to_disk, without the writer
        return list(planner._tensors)

    def _find(self, model_ref: Any, weight: Any) -> tuple[SourceIndex, str | None]:
        index = self.sources.get(str(Path(str(model_ref.model.path)).resolve()))
        if index is None:
            raise ConfigError(f"merge: model '{model_ref.model.path}' is not one of the "
                              "evolve job's models")
        names = [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]
        name = next((n for n in names if index.has(n)), None)
        if name is None and not weight.optional:
            raise ConfigError(f"model '{index.folder}': tensor {weight.name} is missing")
        return index, name

    def _load(self, model_ref: Any, weight: Any, dtype: str | None,
              rows: tuple[int, int] | None = None) -> Any:
        import torch

        index, name = self._find(model_ref, weight)
        if name is None:
            return None
        tensor = index.get(name, rows)
        if dtype:
            tensor = tensor.to(getattr(torch, dtype))
        return tensor.to(self.device)

    def iter_apply(self, config: Any) -> Iterator[tuple[int, int]]:
        """Merge `config` into the model, yielding (done, total) after each tensor."""
        import torch

        planned = self._planned(config)
        chunked = config.merge_method in ELEMENTWISE
        written: set[str] = set()
        with torch.no_grad():
            for done, (weight, task) in enumerate(planned, start=1):
                target = self._target(weight)
                if target is None:
                    continue
                if (config.merge_method in SPARSE and target.dim() > 0
                        and target.numel() > MERGE_CHUNK_ELEMENTS
                        and self._sparse_into(weight, task, target)):
                    written.add(weight.name)
                    yield done, len(planned)
                    continue
                for rows in self._chunks(target, chunked):
                    part = target if rows is None else target[rows[0]:rows[1]]
                    if not self._merge_into(weight, task, part, rows):
                        break
                else:
                    written.add(weight.name)
                yield done, len(planned)
        missing = [n for n, p in self.targets.items()
                   if n not in written and not self._tied_written(p, written)]
        if missing:
            raise ConfigError(f"merge: the configuration leaves {len(missing)} tensor(s) of "
                              f"the model unmerged (e.g. {missing[0]})")

    # --- ties / dare_ties on big tensors -------------------------------------------------

    def _sparse_into(self, weight: Any, task: Any, target: Any) -> bool:
        """mergekit's generalized task arithmetic (ties, dare_ties) for one big tensor in
        two passes over row chunks, so no stack of whole fp32 task vectors is ever held.
        Pass 1 finds, per model, the magnitude threshold (ties: the k-th largest |delta|,
        mergekit keeps the top k) and the L1 rescale factor; pass 2 merges chunk by chunk
        (sign consensus and the weighted sum are element-wise). Equal to mergekit's
        merge_group except where |delta| has exact ties at the threshold (mergekit's
        argsort then picks arbitrarily among them) and, for dare, in which random mask is
        drawn (here from a generator seeded per candidate, tensor and model). False when
        the tensor is not the plain case (a missing optional input): the caller then uses
        mergekit's own whole-tensor path."""
        sparse = self._sparse_merge(weight, task, target)
        if sparse is None:
            return False
        # pass 1: thresholds and rescale factors, per model
        plan = {i: sparse.threshold_and_scale(i, ref) for i, ref in enumerate(sparse.others)}
        # pass 2: merge chunk by chunk
        for span in sparse.spans:
            target[span[0]:span[1]].copy_(sparse.merged_rows(span, plan))
        return True

    def _sparse_merge(self, weight: Any, task: Any, target: Any) -> _SparseMerge | None:
        """The task's inputs bound as mergekit binds them (defaults, per-input weight and
        density) and the row spans of `target`; None when it is not the plain case."""
        import torch
        from mergekit import merge_methods
        from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup
        from mergekit.sparsify import SparsificationMethod

        method = merge_methods.get(task.method_name)
        base_ref = task.base_model
        gather = task.gather_tensors
        found = {ref: self._find(ref, info) for ref, info in gather.weight_info.items()}
        if base_ref is None or any(name is None for _, name in found.values()):
            return None
        refs = list(task.model_order)
        others = [r for r in refs if r != base_ref]
        # mergekit's own binding: defaults, per-input weight and density
        meta = TensorGroup(entries=tuple(
            TensorEntry(id=r, tensor=torch.empty(0), is_base=r == base_ref) for r in refs))
        supplied = dict(task.parameters.items())
        for spec in method.spec.input_parameters:
            supplied[spec.name] = PerInputValues(
                [(r, task.input_parameters[r][spec.name]) for r in others])
        bound = method._bind_parameters((meta,), supplied)[0]
        magnitude = method.sparsification_method == SparsificationMethod.magnitude
        random = method.sparsification_method == SparsificationMethod.random
        if not (magnitude or random) or method.consensus_method not in (None, "sum"):
            return None
        rows_total = target.shape[0]
        per_row = max(1, target.numel() // rows_total)
        step = max(1, MERGE_CHUNK_ELEMENTS // per_row)
        return _SparseMerge(
            merger=self, name=weight.name, gather=gather, dtype=gather.dtype or "float32",
            base_ref=base_ref, others=others, bound=bound, magnitude=magnitude,
            consensus=method.consensus_method, size=target.numel(),
            spans=[(a, min(a + step, rows_total)) for a in range(0, rows_total, step)],
            seed=torch.initial_seed())

    @staticmethod
    def _chunks(target: Any, chunked: bool) -> Iterator[tuple[int, int] | None]:
        if not chunked or target.dim() == 0 or target.numel() <= MERGE_CHUNK_ELEMENTS:
            yield None
            return
        per_row = max(1, target.numel() // target.shape[0])
        step = max(1, MERGE_CHUNK_ELEMENTS // per_row)
        for start in range(0, target.shape[0], step):
            yield start, min(start + step, target.shape[0])

    def _merge_into(self, weight: Any, task: Any, part: Any, rows: tuple[int, int] | None
                    ) -> bool:
        """Merge one tensor (or rows of it) with mergekit's task into `part`; False when
        the task gives nothing (an optional tensor no model has)."""
        gather = task.gather_tensors
        tensors = {}
        for model_ref, info in gather.weight_info.items():
            value = self._load(model_ref, info, info.force_dtype or gather.dtype, rows)
            if value is not None:
                tensors[model_ref] = value
        result = task.execute(tensors=tensors)
        del tensors
        if result is None:
            return False
        if tuple(result.shape) != tuple(part.shape):
            raise ConfigError(f"merge: tensor {weight.name} merges to {list(result.shape)}, "
                              f"the model has {list(part.shape)}")
        part.copy_(result)  # fp32 result -> the parameter's dtype, in place
        return True

    def apply(self, config: Any, progress: Progress | None = None) -> None:
        for done, total in self.iter_apply(config):
            if progress is not None:
                progress(done, total)

    def _target(self, weight: Any) -> Any:
        for name in (weight.name, *(weight.aliases or ())):
            if name in self.targets:
                return self.targets[name]
        return None

    def _tied_written(self, param: Any, written: set[str]) -> bool:
        return any(self.targets[n] is param for n in written if n in self.targets)

    def close(self) -> None:
        for index in self.sources.values():
            index.close()


@dataclass
class _SparseMerge:
    """One big tensor's ties / dare_ties merge (InMemoryMerger._sparse_into): its inputs read
    in row spans, each model's threshold and rescale factor, and the merged rows."""

    merger: InMemoryMerger
    name: str  # the tensor's name (seeds dare's masks)
    gather: Any
    dtype: str
    base_ref: Any
    others: list[Any]  # the models merged into the base, in the task's order
    bound: dict[str, Any]  # mergekit's bound parameters: weight, density, rescale, ...
    magnitude: bool  # ties (magnitude sparsification); else dare (random)
    consensus: str | None
    size: int
    spans: list[tuple[int, int]]
    seed: int

    def rows_of(self, ref: Any, span: tuple[int, int]) -> Any:
        return self.merger._load(ref, self.gather.weight_info[ref], self.dtype, span).float()

    def draw(self, i: int, span: tuple[int, int], shape: Any, density: float) -> Any:
        import torch

        device = self.merger.device
        gen = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + _crc(self.name) * 101 + i * 7919
                         + span[0]) % (2**63 - 1))
        return (torch.rand(shape, generator=gen, device=device) < density).float()

    def threshold_and_scale(self, i: int, ref: Any) -> tuple[float | None, float]:
        """Pass 1 for one model: its magnitude threshold (ties: the k-th largest |delta|;
        dare: None) and its L1 rescale factor."""
        density = float(self.bound["density"][ref])
        if density >= 1:
            return None, 1.0
        if self.magnitude:
            threshold, before, after = self._top_k(ref, density)
        else:
            threshold = None
            before = after = 0.0
            for span in self.spans:
                delta = self.rows_of(ref, span) - self.rows_of(self.base_ref, span)
                before += float(delta.abs().sum())
                after += float((delta * self.draw(i, span, delta.shape, density)).abs().sum())
        scale = (before / after if self.bound["rescale"] and before >= 1e-7 and after >= 1e-7
                 else 1.0)
        return threshold, scale

    def _top_k(self, ref: Any, density: float) -> tuple[float, float, float]:
        """ties: the k-th largest |delta| over the whole tensor, and the L1 norms of the
        deltas before and after keeping the top k."""
        import torch

        size = self.size
        k = max(1, int(density * size)) if density > 0 else 0
        flat = torch.empty(size, dtype=torch.float32, device=self.merger.device)
        at = 0
        for span in self.spans:
            piece = (self.rows_of(ref, span) - self.rows_of(self.base_ref, span)).abs().reshape(-1)
            flat[at:at + piece.numel()] = piece
            at += piece.numel()
        before = float(flat.sum())
        if not k:
            threshold, after = float("inf"), 0.0
        elif flat.device.type == "cpu":
            # in place: the top k end up in flat[size - k:], no copy, no indices
            array = flat.numpy()
            array.partition(size - k)
            threshold = float(array[size - k])
            after = float(flat[size - k:].sum())
        else:
            threshold = float(torch.kthvalue(flat, size - k + 1).values)
            after = float(torch.where(flat >= threshold, flat, 0).sum())
        del flat
        return threshold, before, after

    def merged_rows(self, span: tuple[int, int],
                    plan: dict[int, tuple[float | None, float]]) -> Any:
        """Pass 2 for one row span: base + the sparsified, weighted, sign-agreed deltas."""
        import torch

        bound = self.bound
        weights = [float(bound["weight"][r]) for r in self.others]
        base = self.rows_of(self.base_ref, span)
        deltas = []
        for i, ref in enumerate(self.others):
            delta = self.rows_of(ref, span) - base
            threshold, scale = plan[i]
            density = float(bound["density"][ref])
            if density < 1:
                mask = ((delta.abs() >= threshold).float() if self.magnitude
                        else self.draw(i, span, delta.shape, density))
                delta = delta * mask
                if scale != 1.0:
                    delta = delta * scale
            deltas.append(delta * weights[i])
        stacked = torch.stack(deltas)
        del deltas
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        w = w.reshape(-1, *([1] * (stacked.dim() - 1)))
        if self.consensus:
            majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
            mask = stacked.sign() == majority
            mixed = (stacked * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = stacked.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if bound["normalize"]:
            mixed /= divisor
        if bound["lambda"] != 1:
            mixed *= bound["lambda"]
        return base + mixed
