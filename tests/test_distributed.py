"""Multi-process training on one machine: two CPU processes joined by ``jax.distributed`` (gloo collectives
over localhost), launched through ``python -m train.main`` exactly as on a cluster, against one process with
the same global batch and the same number of devices.

Tolerances: both runs compute the same global batch on 4 devices; only the cross-device reductions differ
(gloo between processes vs in-process), which changes float32 sums in the last bits. 1e-5 absolute on
losses and parameters after a few Adam steps leaves room for that and nothing else (a different batch
order or a lost step moves the loss by > 1e-2 and parameters by ~lr = 1e-4 per step).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 4  # in total: 2 processes x 2, or 1 process x 4
TOL = 1e-5
# Adam divides each gradient by its own running magnitude, so a gradient that is a rounding-level remainder
# of cancelling sums (its value set by the order of the sums, which differs between 1 and 2 processes)
# still moves its parameter by up to the learning rate. A larger epsilon makes such updates proportional to
# the gradient (which also lets the parameters see a wrongly scaled gradient, which Adam's scale invariance
# hides): parameters and losses then differ by float32 rounding only.
ADAM_EPS = "--config.optim.eps=1e-3"

# 8 steps of global batch 8 on 48 records (6 steps per epoch, so one epoch boundary is crossed),
# checkpoints every 2 steps, no evaluation unless a test asks for it.
ARGS = [
    "--config.data.synthetic.num_train=48", "--config.data.synthetic.num_val=8",
    "--config.data.synthetic.image_size=64", "--config.data.image_size=64", "--config.batch_size=8",
    "--config.eval.batch_size=8", "--config.max_steps=8", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2", "--config.eval_at_start=false", "--config.eval.enabled=false",
    "--config.eval.max_new_tokens=2", ADAM_EPS,
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(local_devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )
    return env


class Job:
    """``num_processes`` copies of the same ``python -m train.main`` command, one per process id."""

    def __init__(self, workdir: Path, num_processes: int, extra=(), log_tag: str = ""):
        self.workdir = workdir
        cmd = [sys.executable, "-m", "train.main", "--config", "cpu_demo.py", "--workdir", str(workdir), *ARGS,
               *extra]
        if num_processes > 1:
            cmd += ["--coordinator_address", f"localhost:{_free_port()}", "--num_processes", str(num_processes)]
        self.logs, self.procs = [], []
        for i in range(num_processes):
            log = workdir.parent / f"{workdir.name}{log_tag}.p{i}.log"
            self.logs.append(log)
            args = cmd + (["--process_id", str(i)] if num_processes > 1 else [])
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(args, cwd=ROOT, env=_env(DEVICES // num_processes),
                                                   stdout=f, stderr=subprocess.STDOUT))

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def signal(self, sig, which=None):
        for i in which if which is not None else range(len(self.procs)):
            self.procs[i].send_signal(sig)

    def wait(self, timeout: float = 900) -> list[int]:
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            raise AssertionError(f"timed out; log tails:\n{self.tails()}") from None

    def tails(self) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]) for log in self.logs)

    def check(self, timeout: float = 900) -> None:
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), f"exit codes {codes}\n{self.tails()}"

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:  # never leave processes behind, whatever failed
        job.kill()


def _start(jobs, *args, **kwargs) -> Job:
    jobs.append(Job(*args, **kwargs))
    return jobs[-1]


def _checkpoints(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _wait_for_checkpoint(job: Job, step: int, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and job.running():
        if any(s >= step for s in _checkpoints(job.workdir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint >= {step} while running\n{job.tails()}")


def _rows(workdir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (workdir / name).read_text().splitlines()]


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(workdir, "metrics.jsonl")}


def _max_param_diff(a: Path, b: Path) -> float:
    pa, pb = load_file(str(a / "export/model.safetensors")), load_file(str(b / "export/model.safetensors"))
    assert set(pa) == set(pb)
    return max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)


@pytest.mark.slow  # about 6 minutes on the 2-core machine: three training processes side by side
def test_two_processes_train_like_one(tmp_path, jobs):
    """2 processes x 2 devices == 1 process x 4 devices (global batch 8): losses of every step and the
    parameters after 3 steps; each process saved its own data position; process 0 alone wrote."""
    short = [f"--config.compilation_cache_dir={tmp_path / 'cache'}", "--config.max_steps=3"]
    ref = _start(jobs, tmp_path / "one", 1, short)
    two = _start(jobs, tmp_path / "two", 2, short)
    ref.check()
    two.check()
    want, got = _losses(ref.workdir), _losses(two.workdir)
    assert sorted(want) == sorted(got) == [1, 2, 3]
    assert len(_rows(two.workdir, "metrics.jsonl")) == 3  # one writer
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=TOL), step
    diff = _max_param_diff(ref.workdir, two.workdir)
    assert diff <= TOL, diff
    data = two.workdir / "checkpoints" / "3" / "data"
    assert {p.name for p in data.glob("process_*.json")} == {"process_0-of-2.json", "process_1-of-2.json"}
    print(f"2 processes vs 1: max |param diff| {diff:.2e}")


@pytest.mark.slow
def test_two_processes_resume_after_sigkill_and_evaluate(tmp_path, jobs):
    """Both processes SIGKILLed mid-run and relaunched with the same commands resume from their shared
    checkpoint and end like one uninterrupted process: every step's loss, the parameters, and the
    validation loss and ANLS (generated tokens gathered from both processes)."""
    cache = [f"--config.compilation_cache_dir={tmp_path / 'cache'}", "--config.eval.enabled=true",
             "--config.eval.num_beams=1"]
    ref = _start(jobs, tmp_path / "one", 1, cache)
    two = _start(jobs, tmp_path / "two", 2, cache)

    _wait_for_checkpoint(two, 2)
    assert two.running(), f"the run ended before it could be killed\n{two.tails()}"
    two.kill()
    killed_at = _checkpoints(two.workdir)[-1]
    assert killed_at < 8 and not (two.workdir / "export").exists()
    before_kill = _losses(two.workdir)

    resumed = _start(jobs, tmp_path / "two", 2, cache, log_tag=".resumed")
    ref.check()
    resumed.check()
    assert f"Resuming from step {killed_at}" in resumed.logs[0].read_text()

    want = _losses(ref.workdir)
    assert sorted(want) == list(range(1, 9))
    # Before the kill: an uninterrupted 2-process run; after it: the resumed one.
    for step, loss in before_kill.items():
        assert loss == pytest.approx(want[step], abs=TOL), step
    # Process 0 alone writes, one row per step: the rows the killed launch wrote after the checkpoint it
    # resumed from were replaced by the resumed launch's.
    rows = _rows(two.workdir, "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert r["loss"] == pytest.approx(want[r["step"]], abs=TOL), r["step"]
    diff = _max_param_diff(ref.workdir, two.workdir)
    assert diff <= TOL, diff
    summary = json.loads((two.workdir / "summary.json").read_text())
    assert summary["step"] == 8 and not summary["preempted"]
    ev_ref, ev_two = _rows(ref.workdir, "eval.jsonl")[-1], _rows(two.workdir, "eval.jsonl")[-1]
    assert ev_two["step"] == ev_ref["step"] == 8 and ev_two["num_examples"] == ev_ref["num_examples"] == 8
    assert ev_two["val_loss"] == pytest.approx(ev_ref["val_loss"], abs=TOL)
    assert ev_two["anls"] == pytest.approx(ev_ref["anls"], abs=1e-6)
    print(f"2 processes vs 1 after SIGKILL at checkpoint {killed_at}: max |param diff| {diff:.2e}, "
          f"val_loss {ev_two['val_loss']:.6f} vs {ev_ref['val_loss']:.6f}, ANLS {ev_two['anls']} vs {ev_ref['anls']}")
