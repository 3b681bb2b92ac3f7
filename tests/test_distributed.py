"""One run on two processes with torchrun (gloo, CPU): the single-process run's losses, replicas
that never drift under every optimizer arm, exact resume after a process is killed, and each
rank's share of the global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from altgrad.errors import UserError
from altgrad.training.checkpoint import list_checkpoints
from altgrad.training import distributed
from altgrad.training.distributed import Context
from altgrad.training.setup import resolve_device
from altgrad.training.tracking import read_metrics
from runs import without_rates

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]


def run(command):
    """Run a command; a failure shows the tail of its output."""
    result = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def train_command(data, runs, name, *options):
    return torchrun("-m", "altgrad", "train", "--preset", "tiny", "--data", str(data), "--runs-dir", str(runs),
                    "--run-name", name, "--device", "cpu", *options)


def test_each_rank_reads_an_equal_disjoint_share_of_the_global_batch():
    assert Context(0, 2).share(4, 8) == ([0, 2], slice(None))  # whole micro-batches
    assert Context(1, 2).share(4, 8) == ([1, 3], slice(None))
    assert Context(1, 2).share(1, 8) == ([0], slice(4, 8))  # else rows of each micro-batch
    assert Context(0, 1).share(3, 5) == ([0, 1, 2], slice(None))
    with pytest.raises(UserError, match="multiple of the number of processes"):
        Context(0, 3).share(2, 8)


def test_each_rank_takes_its_local_gpu_and_nccl_there(monkeypatch):
    """The CUDA-only branches, on a CPU machine: the device each rank uses, and the backend."""
    assert Context(3, 4, local_rank=1).device(torch.device("cuda")) == torch.device("cuda", 1)
    assert Context(3, 4, local_rank=1).device(torch.device("cpu")) == torch.device("cpu")
    assert Context().device(torch.device("cuda")) == torch.device("cuda")  # one process: as asked
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))
    assert distributed.start(Context(1, 2, local_rank=1), torch.device("cuda", 1))
    assert distributed.start(Context(1, 2), torch.device("cpu"))
    assert not distributed.start(Context(), torch.device("cuda"))  # nothing to join alone
    assert calls == ["cuda:1", "nccl", "gloo"]


def test_resolve_device_refuses_cuda_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="sees no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("accumulation, fmt", [(2, "E5M2"), (1, None)], ids=["micro-batches-fp8", "rows-fp32"])
def test_two_processes_train_the_single_process_run(tmp_path, tiny_data, accumulation, fmt):
    """Whole micro-batches per rank: the same casts as one process, FP8 included. Rows of each
    micro-batch: the same FP32 run (in bf16 half a GEMM rounds differently); under FP8 a half batch
    has its own per-tensor scales (as in real data-parallel FP8 training), so only the micro-batch
    split repeats a one-process FP8 run."""
    options = ["--max-steps", "20", "--grad-accum", str(accumulation)] + \
        (["--format", fmt] if fmt else ["--precision", "fp32"])
    run(train_command(tiny_data, tmp_path, "two", *options))
    one_process = train_command(tiny_data, tmp_path, "one", *options)  # the same command, one process
    one_process[one_process.index("--nproc_per_node=2")] = "--nproc_per_node=1"  # and the same threads
    run(one_process)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]  # rank 0 alone logs
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad/norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 20


ARMS = {
    "A": {"optimizer": "adamw"},
    "B": {"optimizer": "adamw", "weight_storage": "format", "update_rounding": "nearest"},
    "C": {"optimizer": "adamw", "weight_storage": "format", "update_rounding": "stochastic"},
    "D": {"optimizer": "manifold"},
    "D-master": {"optimizer": "manifold", "weight_storage": "master"},
    "E": {"optimizer": "grid"},
}


def test_replicas_never_drift_under_any_arm(tmp_path, tiny_data):
    """Stochastic weight casts, stochastic updates and random rungs draw the same bits on every
    rank: after several steps every rank holds the same weights and optimizer state, bit for bit."""
    runs = {arm: {**settings, "format": "E5M2", "rounding": "stochastic", "max_steps": 8, "dropout": 0.1,
                  "grad_accum": 2, "stats_interval": 4} for arm, settings in ARMS.items()}
    worker = Path(__file__).parent / "ddp_worker.py"
    run(torchrun(str(worker), str(tmp_path), str(tiny_data), json.dumps(runs)))
    for arm in ARMS:
        zero = torch.load(tmp_path / f"{arm}-rank0.pt", weights_only=True)
        one = torch.load(tmp_path / f"{arm}-rank1.pt", weights_only=True)
        for key, tensor in zero["model"].items():
            if torch.is_tensor(tensor):
                assert torch.equal(tensor, one["model"][key]), (arm, key)
        for index, state in zero["optimizer"]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, one["optimizer"]["state"][index][name]), (arm, index, name)
        if "altgrad" in zero["optimizer"]:
            assert torch.equal(zero["optimizer"]["altgrad"]["generator"], one["optimizer"]["altgrad"]["generator"])


def test_a_killed_process_ends_the_run_resumably_and_the_resume_is_exact(tmp_path, tiny_data):
    # statistics and the FP32 shadow on every step: slow enough steps to kill the job mid-run
    options = ["--format", "E5M2", "--max-steps", "60", "--checkpoint-interval", "10", "--optimizer", "grid",
               "--stats-interval", "1", "--shadow", "--shadow-interval", "1"]
    run(train_command(tiny_data, tmp_path / "full", "run", *options))
    runs = tmp_path / "killed"
    job = subprocess.Popen(train_command(tiny_data, runs, "run", *options), env=ENV, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(runs / "run"):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-f", f"runs-dir {runs} "], capture_output=True, text=True).stdout.split()
    workers = [int(pid) for pid in workers if int(pid) != job.pid]
    assert workers, "no worker processes found"
    os.kill(max(workers), signal.SIGKILL)  # the last one started: a worker, not the launcher
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and "FAILED" in output and "exitcode" in output
    last = list_checkpoints(runs / "run")
    assert last and int(last[-1].stem.removeprefix("step_")) < 60
    run(train_command(tiny_data, runs, "run", *options, "--resume"))
    assert without_rates(read_metrics(runs / "run")) == without_rates(read_metrics(tmp_path / "full" / "run"))
