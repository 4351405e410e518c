"""The train job in two CPU processes (Accelerate, DDP over gloo) on a tiny model, for real:
the loss curve is the one-process run's at the same global batch, the adapter loads in plain
PEFT, only rank 0 writes, a killed run resumes, a cancel stops the processes after a
checkpoint; and the memory planner's per-process share."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

import pytest
import yaml

from pipelines.config import ConfigError, parse_job
from pipelines.events import iter_events
from pipelines.jobs import JobCancelled, JobContext, get_job
from pipelines.training.trainer import COMPLETE
from pipelines.workspace import Workspace
from tests.training.conftest import train_job
from tests.training.test_resume import kill_after_a_checkpoint, start

# Measured on this CPU (tiny Gemma-2, 6 steps, batch 4 = 2 x 2, fp32): the two runs' training
# losses differ by at most 9.5e-7 (float summation order: DDP all-reduces the gradients in
# another order than one process sums them); the bound leaves room for other BLAS builds.
LOSS_TOLERANCE = 1e-3
# The eval loss is the Trainer's mean of per-batch means, and a process's eval batch is its
# share (2 examples, not 4): measured 2.9e-3 apart (of 8.43) for the same weights.
EVAL_TOLERANCE = 1e-2


def run_job(configs, tmp_path, run="run", **changes):
    ws = Workspace.load(configs)
    cfg = parse_job(train_job(**changes), "test")
    ctx = JobContext.create(ws, tmp_path / run)
    return list(get_job("train").run(cfg, ctx)), ctx


def losses(events) -> dict[int, float]:
    return {e.step: e.value for e in events if e.type == "metric" and e.name == "loss"}


def test_batch_must_split_among_processes():
    with pytest.raises(ConfigError, match="does not split evenly"):
        parse_job(train_job(batch_size=3, processes=2), "test")


def test_fsdp_is_refused_on_the_cpu(train_configs, tmp_path):
    with pytest.raises(ConfigError, match="fsdp"):
        run_job(train_configs, tmp_path, processes=2, distributed="fsdp", eval_questions=0)


def test_a_failed_launch_is_one_line_naming_the_log(train_configs, tmp_path, monkeypatch):
    from pipelines.jobs import trainer_loop

    monkeypatch.setattr(trainer_loop, "launch_command", lambda n, folder: [
        sys.executable, "-c", "import sys; print('RuntimeError: rank 1 ran out of memory'); "
        "sys.exit(3)"])
    with pytest.raises(trainer_loop.WorkerFailed) as caught:
        run_job(train_configs, tmp_path, processes=2, eval_questions=0)
    message = str(caught.value)
    assert "exit 3" in message and "rank 1 ran out of memory" in message
    assert "worker.log" in message and "\n" not in message


# torchrun's summary when a rank died of a signal (from a CI run's worker.log)
TORCHRUN_SIGNAL_LOG = """\
terminate called without an active exception
W1129 22:47:01.448000 12791 torch/distributed/elastic/multiprocessing/api.py:1028] Sending \
process 12794 closing signal SIGTERM
Traceback (most recent call last):
  File "torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
pipelines.jobs.distributed_worker FAILED
-------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 12794)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 12794
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 12795)  (SIGABRT)
  error_file: <N/A>
  traceback : Signal 6 (SIGABRT) received by PID 12795
=======================================================
"""


def test_the_failure_line_names_the_ranks_own_error(tmp_path):
    """The one line of a failed launch: a rank's own exception, else the signal the root-
    cause rank died of; never the launcher's ChildFailedError or "error_file: <N/A>"."""
    from pipelines.jobs.trainer_loop import _last_line

    log = tmp_path / "worker.log"
    log.write_text(TORCHRUN_SIGNAL_LOG, encoding="utf-8")
    assert _last_line(log) == "Signal 6 (SIGABRT) received by PID 12795"
    log.write_text("  File \"x.py\", line 3\ntorch.OutOfMemoryError: CUDA out of memory. "
                   "Tried to allocate 2.00 GiB\n" + TORCHRUN_SIGNAL_LOG, encoding="utf-8")
    assert _last_line(log).startswith("torch.OutOfMemoryError: CUDA out of memory")
    log.write_text("[rank1]: Traceback (most recent call last):\n[rank1]: ValueError: bad "
                   "batch\n" + TORCHRUN_SIGNAL_LOG, encoding="utf-8")
    assert _last_line(log) == "[rank1]: ValueError: bad batch"
    assert _last_line(tmp_path / "missing.log") == "no log"


def test_the_memory_estimate_is_one_process_share(train_configs, tiny_gemma):
    """Each process holds its share of the batch: the estimate of batch 8 in 2 processes
    is that of batch 4 in one; the refusal is against one device, and its suggestion is a
    global batch_size that still splits among the processes."""
    from pipelines.plan import model_shape
    from pipelines.training import memory

    ws = Workspace.load(train_configs)
    two = parse_job(train_job(batch_size=8, processes=2), "test")
    half = parse_job(train_job(batch_size=4), "test")
    shape = model_shape(tiny_gemma)
    sizes = memory.sizes_from_files(two, ws, tiny_gemma)
    est = memory.train_estimate(two, shape, sizes, cuda=True)
    assert est.total == memory.train_estimate(half, shape, sizes, cuda=True).total
    whole = parse_job(train_job(batch_size=8), "test")
    assert est.total < memory.train_estimate(whole, shape, sizes, cuda=True).total
    # a GPU with room for batch 2 a process, not 4: try batch_size 4 (2 each), grad_accum 2
    room = memory.train_estimate(half, shape, sizes, cuda=True, batch=2).total / memory.MARGIN
    gpu = memory.Device("cuda", "one GPU", room * 1.001, room * 2)
    why = memory.refusal(two, shape, sizes, gpu)
    assert why is not None and "try batch_size: 4, grad_accum: 2" in why, why


def test_kyara_plan_counts_every_process(train_configs, tiny_gemma):
    """`kyara plan`: on the CPU the host holds every process (the job compares one
    process's estimate with a 1/N share of RAM: the same verdict); on CUDA the GPU terms
    are one GPU's and the host holds N runtimes."""
    from pipelines.plan import plan_train

    ws = Workspace.load(train_configs)
    two = parse_job(train_job(batch_size=8, processes=2), "test")
    half = parse_job(train_job(batch_size=4), "test")
    cpu_two = plan_train(two, str(tiny_gemma), device="cpu", workspace=ws)
    cpu_half = plan_train(half, str(tiny_gemma), device="cpu", workspace=ws)
    assert [t.bytes for t in cpu_two.host] == [2 * t.bytes for t in cpu_half.host]
    assert any("2 processes: batch 4 each" in n for n in cpu_two.notes)
    gpu_two = plan_train(two, str(tiny_gemma), device="cuda", workspace=ws)
    gpu_half = plan_train(half, str(tiny_gemma), device="cuda", workspace=ws)
    assert [t.bytes for t in gpu_two.gpu] == [t.bytes for t in gpu_half.gpu]
    assert [t.bytes for t in gpu_two.host] == [2 * t.bytes for t in gpu_half.host]


def test_two_processes_match_one(train_configs, tmp_path):
    """Same job, same global batch (batch_size 4: one process of 4, two of 2 each), on 8
    training examples: two full batches an epoch (a last, partial batch is filled up from
    the epoch's start in each process, as Accelerate does, and differs)."""
    common = dict(max_steps=6, save_steps=3, batch_size=4, eval_fraction=0.3,
                  eval_questions=1, eval_max_new_tokens=4)
    one, _ = run_job(train_configs, tmp_path / "one", name="one", **common)
    system_tmp = set(os.listdir(tempfile.gettempdir()))
    two, ctx = run_job(train_configs, tmp_path / "two", name="two", processes=2, **common)
    assert two[-1].type == "done", two[-1]
    stages = [e.stage for e in two if e.type == "stage"]
    assert stages == ["data", "model", "memory", "train", "save", "eval"]

    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"largest loss difference, 1 vs 2 processes: {worst:.2e}")
    assert worst < LOSS_TOLERANCE, (a, b)
    summary = two[-1].summary
    assert summary["steps"] == 6 and summary["processes"] == 2
    assert abs(summary["eval_loss"] - one[-1].summary["eval_loss"]) < EVAL_TOLERANCE

    # rank 0 alone wrote: each step's progress once, one set of checkpoints with the
    # marker, the model and optimizer once; each rank's own RNG state beside them
    steps = [e.current for e in two if e.type == "progress" and e.stage == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    out = ctx.home / "runs" / "two"
    for step in (3, 6):
        folder = out / "checkpoints" / f"checkpoint-{step}"
        assert (folder / COMPLETE).is_file()
        assert sorted(p.name for p in folder.glob("rng_state*")) == [
            "rng_state_0.pth", "rng_state_1.pth"]
        assert len(list(folder.glob("optimizer*"))) == 1
    memory = next(e.message for e in two if e.type == "log" and "memory estimate" in e.message)
    assert "each of 2 processes, batch 2" in memory

    # the adapter, copied from rank 0's, loads in plain PEFT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(yaml.safe_load(
        (train_configs / "models" / "tiny-gemma.yaml").read_text())["model"])
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert summary["mini_eval"]["after"]["n"] == 1

    # torchrun's never-removed `torchelastic_*` folder is in the job's folder, not the system's
    left = {n for n in set(os.listdir(tempfile.gettempdir())) - system_tmp
            if n.startswith("torchelastic_")}
    assert not left
    assert list((out / "distributed" / "tmp").glob("torchelastic_*"))


def _ranks_of(folder) -> list[int]:
    """The pids of worker processes whose command line names `folder`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read().decode(errors="replace")
            except OSError:
                continue
            if "distributed_worker" in cmd and str(folder) in cmd:
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_two_processes_resume_after_sigkill(train_configs, tmp_path):
    """The job (parent) killed with SIGKILL alone: its ranks go too; the next run resumes
    from the last complete checkpoint, in two processes again."""
    job = train_job(name="resume-ddp", max_steps=400, save_steps=4, batch_size=2,
                    processes=2, eval_fraction=0.0, eval_questions=0, keep_checkpoints=3)
    cfg_path = train_configs / "jobs" / "resume-ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(job, allow_unicode=True, sort_keys=False),
                        encoding="utf-8")
    out = tmp_path / "home" / "runs" / "resume-ddp"
    checkpoints = out / "checkpoints"

    def why(run: str) -> str:  # what the job and its ranks said, for a failure's message
        events = list(iter_events(tmp_path / run / "events.jsonl"))
        log = out / "distributed" / "worker.log"
        tail = log.read_text(errors="replace")[-1500:] if log.is_file() else "no worker.log"
        return f"last events: {events[-3:]}; worker.log ends: {tail}"

    first = start(cfg_path, tmp_path / "run1", train_configs)
    try:
        kill_after_a_checkpoint(first, checkpoints, group=False)  # the job's process alone
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {why('run1')}") from None
    deadline = time.monotonic() + 60
    while _ranks_of(out / "distributed"):
        assert time.monotonic() < deadline, "the ranks outlived the killed job by 60 s"
        time.sleep(0.2)
    done = sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob(f"*/{COMPLETE}"))
    last = done[-1]
    assert last < 400

    second = start(cfg_path, tmp_path / "run2", train_configs)
    assert second.wait(timeout=300) == 0, why("run2")
    events = list(iter_events(tmp_path / "run2" / "events.jsonl"))
    assert events[-1].type == "done", why("run2")
    assert f"resuming from checkpoint-{last}" in [e.message for e in events if e.type == "log"]
    progress = [e.current for e in events if e.type == "progress" and e.stage == "train"]
    assert progress[0] == last and progress[-1] == 400
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cancel_stops_the_processes_after_a_checkpoint(train_configs, tmp_path):
    ws = Workspace.load(train_configs)
    cfg = parse_job(train_job(name="cancel-ddp", max_steps=400, save_steps=50, batch_size=2,
                              processes=2, eval_fraction=0.0, eval_questions=0), "test")
    ctx = JobContext.create(ws, tmp_path / "run")
    seen = []
    with pytest.raises(JobCancelled):
        for event in get_job("train").run(cfg, ctx):
            seen.append(event)
            if event.type == "progress" and event.stage == "train" and event.current >= 2:
                threading.Thread(target=ctx.cancel).start()
    out = ctx.home / "runs" / "cancel-ddp"
    assert not _ranks_of(out / "distributed")
    marked = list((out / "checkpoints").glob(f"checkpoint-*/{COMPLETE}"))
    assert len(marked) == 1  # saved at the step it stopped on, not at save_steps
    assert json.loads(marked[0].read_text())["step"] < 50


def test_dpo_in_two_processes_matches_one(train_configs, tmp_path, tiny_gemma):
    """The prefer job through the same path: DPO at batch 2 (1 + 1), the same losses."""
    from tests.training.prefer_helpers import pair_rows, prefer_job, write_rows

    data = write_rows(tmp_path / "prefs.jsonl", pair_rows())
    ws = Workspace.load(train_configs)
    runs = {}
    for processes in (1, 2):
        cfg = parse_job(prefer_job(name=f"dpo-{processes}", data=str(data), max_steps=3,
                                   eval_questions=0, processes=processes), "test")
        ctx = JobContext.create(ws, tmp_path / f"run{processes}")
        runs[processes] = list(get_job("prefer").run(cfg, ctx))
    one, two = runs[1], runs[2]
    assert two[-1].type == "done", two[-1]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"DPO: largest loss difference, 1 vs 2 processes: {worst:.2e}")
    assert worst < LOSS_TOLERANCE, (a, b)
    assert "reward_margin" in {e.name for e in two if e.type == "metric"}
    from tests.training.test_prefer_job import assert_plain_peft

    assert_plain_peft(ctx.home / "runs" / "dpo-2" / "adapter", tiny_gemma)


# --- FSDP: what can be checked without GPUs (a run needs two: bench/gpu/) -----------------

GEMMA2_2B_SHAPE = dict(params=2_614_341_888, hidden=2304, layers=26, heads=8,
                       intermediate=9216, vocab=256000, kv_heads=4, head_dim=256)


def test_fsdp_holds_a_shard_of_the_weights_per_gpu():
    """Gemma-2-2B shapes in bf16 on 2 GPUs: each holds half the weights, the embeddings'
    other half and two decoder layers gathered, half the adapter and optimizer; the
    activations are its share of the batch as under DDP. The CPU estimate is unchanged
    (the job refuses FSDP there)."""
    from pipelines.training import memory

    shape = memory.ModelShape(**GEMMA2_2B_SHAPE)
    sizes = memory.DataSizes(512, 256)
    ddp = parse_job(train_job(batch_size=8, processes=2), "test")
    fsdp = parse_job(train_job(batch_size=8, processes=2, distributed="fsdp"), "test")
    a = memory.train_estimate(ddp, shape, sizes, cuda=True)
    b = memory.train_estimate(fsdp, shape, sizes, cuda=True)
    embeddings = 256000 * 2304 * 2
    layer = (shape.params - 256000 * 2304) * 2 / 26
    assert b.weights == int(a.weights / 2 + embeddings / 2 + 2 * layer)
    assert b.weights < 0.75 * a.weights
    assert (b.adapter, b.optimizer) == (a.adapter // 2, a.optimizer // 2)
    assert (b.activations, b.logits) == (a.activations, a.logits)
    assert memory.train_estimate(fsdp, shape, sizes, cuda=False).total == \
        memory.train_estimate(ddp, shape, sizes, cuda=False).total
    # too big for a GPU: the remedies keep to what FSDP can do (no 4-bit)
    gpu = memory.Device("cuda", "one GPU", b.total * 0.5, b.total)
    assert "qlora" not in (memory.suggestion(fsdp, shape, sizes, gpu) or "")


def test_qlora_with_fsdp_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="distributed: ddp") as caught:
        parse_job(train_job(batch_size=4, processes=2, distributed="fsdp", qlora=True), "test")
    assert "\n" not in str(caught.value).strip().splitlines()[-1]
    parse_job(train_job(batch_size=4, processes=2, qlora=True), "test")  # DDP: allowed


def test_fsdp_arguments_give_accelerate_fsdp2_with_a_full_state_dict(tmp_path):
    """The arguments the worker's Trainer gets: FSDP2, one unit per decoder layer, the
    state dict gathered whole for saving; none for DDP or one process."""
    from trl import SFTConfig

    from pipelines.training.trainer import common_arguments

    fsdp = parse_job(train_job(batch_size=4, processes=2, distributed="fsdp"), "test")
    args = SFTConfig(**common_arguments(fsdp, tmp_path, False, False))
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": False, "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True}
    assert args.per_device_train_batch_size == 2
    for changes in ({"processes": 2}, {"distributed": "fsdp"}):
        cfg = parse_job(train_job(batch_size=4, **changes), "test")
        assert SFTConfig(**common_arguments(cfg, tmp_path, False, False)).fsdp \
            in (None, False, "")


@pytest.mark.parametrize("kind", ["train", "prefer"])
def test_the_adapter_saved_from_a_gathered_state_dict_is_the_models(tiny_gemma, tmp_path,
                                                                     kind):
    """FSDP saves from the full state dict rank 0 gathers, DDP from the model: the same
    adapter tensors either way, taken from the dict when one is given; a prefer job's
    reference copy is in neither."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipelines.jobs.distributed_worker import save_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gemma),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                      init_lora_weights=False))
    if kind == "prefer":
        model.add_adapter("ref", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    save_adapter(kind, model, tmp_path / "plain", None)
    # the gathered dict's values are what is saved (shifted here to tell them apart)
    save_adapter(kind, model, tmp_path / "gathered",
                 {k: v + 1 if "lora_" in k else v for k, v in model.state_dict().items()})
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    gathered = load_file(tmp_path / "gathered" / "adapter_model.safetensors")
    assert sorted(plain) == sorted(gathered) and any("lora_A" in k for k in plain)
    assert all(torch.equal(plain[k] + 1, gathered[k]) for k in plain)
    assert not (tmp_path / "gathered" / "ref").exists()
