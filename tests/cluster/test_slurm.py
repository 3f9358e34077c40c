"""launch/slurm/train.sbatch and chain.sh on a real (private, local) Slurm cluster.

Every job runs 2 CPU ranks (one node, `--ntasks-per-node=2`, JANUS_DEVICE=cpu) of the tiny
recipe. The uninterrupted run is computed once and is the reference for every run that is
preempted, requeued, chained or crashed and resumed: their final losses must be bitwise equal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
CHAIN = REPO / "launch" / "slurm" / "chain.sh"
# One node, two CPU ranks; the script's GPU defaults are overridden the way a user would.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:30:00"]
JOB_TIMEOUT = 600  # seconds; a generous bound for one tiny run on a busy 2-core machine


def metrics(run_dir: Path) -> dict[tuple[int, int], dict]:
    """(stage, step) -> the last metrics line logged for it (a resumed run appends)."""
    rows: dict[tuple[int, int], dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[(int(row["stage"]), int(row["step"]))] = row
    return rows


def assert_same_losses(run_dir: Path, reference: Path) -> None:
    got, want = metrics(run_dir), metrics(reference)
    assert sorted(got) == sorted(want), f"logged steps differ: {sorted(got)} vs {sorted(want)}"
    for key in want:
        for loss in ("loss", "loss_und", "loss_text", "loss_gen"):
            assert got[key][loss] == want[key][loss], (
                f"{loss} at (stage, step) {key}: {got[key][loss]!r} != uninterrupted {want[key][loss]!r}")


def job_log(run_dir: Path, job_id: int) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.log"
    return path.read_text() if path.exists() else f"<no log at {path}>"


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def submit(cluster, trainer, tmp: Path, run_dir: Path, *overrides: str) -> int:
    """sbatch the real train.sbatch for `trainer` with two CPU ranks; returns the job id."""
    return cluster.sbatch([*CPU_JOB, f"--output={tmp}/slurm-%j.out", str(SBATCH),
                           *trainer.overrides(run_dir), *overrides],
                          env=trainer.job_env(pid_dir=run_dir / "pids"))


def wait_for_steps(run_dir: Path, n: int, job_id: int, cluster, timeout: float = JOB_TIMEOUT) -> None:
    """Block until at least n steps are in metrics.jsonl (the job is mid-run)."""
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job_id} is {state} before step {n}:\n{job_log(run_dir, job_id)}")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not log {n} steps in {timeout} s:\n{job_log(run_dir, job_id)}")


def rank_pid(run_dir: Path, rank: int) -> int:
    return int((run_dir / "pids" / f"rank-{rank}.pid").read_text())


@pytest.fixture(autouse=True)
def idle_cluster_after_test(request):
    """A failed test may leave its job running (a stopped rank, say); cancel it so that the
    next test gets the node."""
    yield
    if "slurm_cluster" in request.fixturenames:
        request.getfixturevalue("slurm_cluster").cancel_all()


@pytest.fixture(scope="module")
def reference(slurm_cluster, trainer, tmp_path_factory):
    """Acceptance (1): one uninterrupted 2-task job of the tiny recipe, trained to completion."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "run"
    job_id = submit(slurm_cluster, trainer, tmp, run_dir)
    info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT)
    return {"run_dir": run_dir, "job_id": job_id, "info": info}


def test_sbatch_two_tasks_trains_to_completion(reference, trainer):
    run_dir, job_id, info = reference["run_dir"], reference["job_id"], reference["info"]
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert info["NumTasks"] == "2"
    assert status(run_dir)["state"] == "completed"
    assert sorted(metrics(run_dir)) == trainer.expected_steps()
    # One log per job in the run dir, with both ranks' output (srun --label) and the verdict.
    assert "2 ranks, device cpu" in log
    for rank in (0, 1):
        assert re.search(rf"^{rank}: ", log, re.M), f"no output from rank {rank}:\n{log}"
    assert "training completed" in log


@pytest.mark.parametrize("how", ["usr1", "usr1_at_start", "scontrol_requeue"])
def test_preempted_job_requeues_and_resumes_to_equal_losses(slurm_cluster, trainer, reference, tmp_path, how):
    """Acceptance (2). usr1: what `--signal=B:USR1@...` delivers near the time limit; the script
    forwards it, the ranks save and it requeues itself. usr1_at_start: the same signal as soon
    as the job runs, before the ranks can handle it (Slurm may send it a minute early); the
    script holds it until they can. scontrol_requeue: an operator (or preemption) requeues the
    job; Slurm sends TERM, the ranks save, Slurm requeues."""
    run_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, trainer, tmp_path, run_dir)
    if how == "usr1_at_start":
        slurm_cluster.wait_job(job_id, lambda j: j.get("JobState") == "RUNNING", 120, "RUNNING")
    else:
        wait_for_steps(run_dir, trainer.interrupt_after, job_id, slurm_cluster)
    if how.startswith("usr1"):
        slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job_id)])
    else:
        slurm_cluster.run(["scontrol", "requeue", str(job_id)])
    # Back in the queue means every rank has exited, so status.json is final for attempt 1.
    slurm_cluster.release_requeued(job_id)
    assert status(run_dir)["state"] == "preempted", job_log(run_dir, job_id)
    preempted_at = status(run_dir)["step"]
    info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert "restart 1 " in log and status(run_dir)["state"] == "completed", log
    assert 0 < preempted_at < len(trainer.expected_steps()), f"not preempted mid-run (step {preempted_at})"
    assert trainer.resumed_line(preempted_at) in log, log
    assert_same_losses(run_dir, reference["run_dir"])


def test_time_limit_signal_requeues_and_resumes(slurm_cluster, trainer, reference, tmp_path):
    """The real thing behind acceptance (2): Slurm's own timer sends USR1 (`--signal=B:USR1@100`
    with a 2-minute limit: 20 s in, give or take Slurm's ~30 s check period), the job requeues
    itself, and after a longer limit the resumed job completes with the uninterrupted losses."""
    run_dir = tmp_path / "run"
    env = trainer.job_env(pid_dir=run_dir / "pids")
    env.update(trainer.slow_env())  # long enough that the signal lands mid-run
    job_id = slurm_cluster.sbatch([*CPU_JOB, "--time=2", "--signal=B:USR1@100", f"--output={tmp_path}/slurm-%j.out",
                                   str(SBATCH), *trainer.overrides(run_dir)], env=env)
    slurm_cluster.wait_job(job_id, lambda j: j.get("Restarts") == "1" or j.get("JobState") != "RUNNING"
                           and j.get("JobState") != "PENDING", 240, "a requeue")
    slurm_cluster.release_requeued(job_id, extend_minutes=30)
    assert "USR1: asking the ranks" in job_log(run_dir, job_id)
    info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log}"
    assert trainer.resumed_line(None) in log, log
    assert_same_losses(run_dir, reference["run_dir"])


def test_bad_override_fails_fast_with_config_error(slurm_cluster, trainer, tmp_path):
    """Acceptance (3): a config error ends the job (exit 2, no requeue) with the error in its log,
    found on the batch host before any rank starts."""
    run_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, trainer, tmp_path, run_dir, "train.stages.stage1.stepz=3")
    info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{log}"
    assert info["Restarts"] == "0"
    assert "config error: train.stages.stage1.stepz" in log, log
    assert "configuration error" in log and "not retrying" in log
    assert not (run_dir / "pids").exists(), "srun started ranks despite the config error"
    assert not (run_dir / "metrics.jsonl").exists(), "a rank trained despite the config error"


def test_chain_afterany_continues_without_requeue(slurm_cluster, trainer, reference, tmp_path):
    """chain.sh: link 1 checkpoints at the USR1 warning and ends; link 2 (afterany) resumes;
    link 3 finds the run completed and exits at once."""
    run_dir = tmp_path / "run"
    env = dict(slurm_cluster.env, **trainer.job_env(pid_dir=run_dir / "pids"))
    res = slurm_cluster.run(["bash", str(CHAIN), "-n", "3", *CPU_JOB, f"--output={tmp_path}/slurm-%j.out",
                             "--", *trainer.overrides(run_dir)], env=env, cwd=REPO)
    jobs = [int(x) for x in (run_dir / "chain.jobs").read_text().split()]
    assert len(jobs) == 3, res.stdout
    wait_for_steps(run_dir, trainer.interrupt_after, jobs[0], slurm_cluster)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(jobs[0])])
    first = slurm_cluster.wait_done(jobs[0], JOB_TIMEOUT)
    assert first["JobState"] == "COMPLETED" and first["Restarts"] == "0", job_log(run_dir, jobs[0])
    assert "next job of the chain resumes" in job_log(run_dir, jobs[0])
    for job_id in jobs[1:]:
        info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT)
        assert info["JobState"] == "COMPLETED", f"{info}\n{job_log(run_dir, job_id)}"
    assert "training completed" in job_log(run_dir, jobs[1])
    assert "nothing to do" in job_log(run_dir, jobs[2])
    assert_same_losses(run_dir, reference["run_dir"])


# A hung rank (SIGSTOP) is caught only by the collective timeout; the engine sets
# parallel.timeout_minutes on every process group (torch's module default included), so the
# peer waiting in any collective fails in time.


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_rank_fault_ends_job_then_resubmission_resumes(slurm_cluster, trainer, reference, tmp_path, fault):
    """A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-run ends the job with a clear message
    within the collective timeout; resubmitting with the same run_dir resumes and matches the
    uninterrupted losses."""
    run_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, trainer, tmp_path, run_dir, *trainer.fault_overrides())
    wait_for_steps(run_dir, trainer.interrupt_after, job_id, slurm_cluster)
    victim = rank_pid(run_dir, 1)
    os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    # The collective timeout (parallel.timeout_minutes) ends it; the bound only keeps a broken job from
    # hanging the suite (the job's own limit is 30 minutes).
    info = slurm_cluster.wait_done(job_id, JOB_TIMEOUT)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "FAILED", f"{info}\n{log}"
    assert "FAILED: training exited with code" in log, log
    if fault == "killed":
        assert f"  {slurm_cluster.node}: task 1: Killed" in log, log  # srun's verdict, repeated at the end
    else:
        assert "rank 0: training failed" in log and "Timed out" in log, log  # the collective timeout

    job2 = submit(slurm_cluster, trainer, tmp_path, run_dir, *trainer.fault_overrides())
    info2 = slurm_cluster.wait_done(job2, JOB_TIMEOUT)
    log2 = job_log(run_dir, job2)
    assert info2["JobState"] == "COMPLETED", f"{info2}\n{log2}"
    assert trainer.resumed_line(None) in log2, log2
    assert_same_losses(run_dir, reference["run_dir"])
