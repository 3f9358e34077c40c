"""A real, private Slurm cluster on localhost for the cluster tests.

`slurm_cluster` (session fixture) installs Debian's slurm-wlm and munge when they are missing
(as root, with apt-get; otherwise the tests are skipped), writes a one-node cons_tres
slurm.conf with this machine's real CPU topology and memory, and starts its own munged,
slurmctld and slurmd in the foreground as children of the test process, on free ports and with
all state in a temporary directory. Nothing touches /etc/slurm or the system munge socket, so it
coexists with a system Slurm. At the end it cancels every job, stops the daemons by PID, and
kills by PID any process left whose environment points at this cluster's slurm.conf.

Client commands reach the cluster through `SlurmCluster.env` (SLURM_CONF set); the test
process's own environment is never changed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def ensure_slurm_installed() -> None:
    """Install slurm-wlm + munge with apt-get when missing; skip the tests if we cannot."""
    missing = [n for n in (*DAEMONS, "sbatch", "scontrol", "mungekey") if _which(n) is None]
    if not missing:
        return
    if os.geteuid() != 0 or _which("apt-get") is None:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing) and cannot be "
                    "installed here (needs root and apt-get): apt-get install slurm-wlm munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    still = [n for n in DAEMONS if _which(n) is None]
    if still:
        pytest.fail(f"apt-get installed slurm-wlm and munge but {still} are still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_kv(text: str) -> dict[str, str]:
    """`scontrol show ... -o` output -> {key: value} (values without spaces are enough here)."""
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", text))


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # Keep the submitting environment free of launcher variables a developer may have set.
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            self.env.pop(var, None)
        self.node = socket.gethostname().split(".")[0]

    # ---- lifecycle -----------------------------------------------------------------------
    def _node_line(self) -> str:
        # slurmd -C prints this machine's real topology and memory; reusing it means slurmd
        # never drains the node for a hardware mismatch.
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        first = out.splitlines()[0]
        fields = {k: v for k, v in parse_kv(first).items() if k != "NodeName"}
        return f"NodeName={self.node} NodeAddr=127.0.0.1 " + " ".join(f"{k}={v}" for k, v in fields.items())

    def write_config(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o755)  # munged wants a traversable socket directory
        self.munge_socket = self.root / "munge" / "munge.sock"
        ctld_port, slurmd_port = _free_port(), _free_port()
        self.conf.write_text(f"""\
# Written by tests/cluster/conftest.py: a private one-node test cluster.
ClusterName=janustest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
# No cgroups in CI containers: track job processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Ranks get this long after TERM (scancel, scontrol requeue) to checkpoint before SIGKILL.
KillWait=30
MinJobAge=600
{self._node_line()}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        time.sleep(0.3)
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited at start with {self.procs[name].returncode}; "
                               f"see {self.root / 'log'}")

    def start(self) -> None:
        self.write_config()
        key = self.root / "munge" / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True)
        os.chmod(key, 0o600)
        self._start("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root}/munge/munged.pid",
                               f"--seed-file={self.root}/munge/seed",
                               f"--log-file={self.root}/log/munged.log"])
        for _ in range(50):
            if self.munge_socket.exists():
                break
            time.sleep(0.1)
        self._start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        deadline = time.time() + 60
        while time.time() < deadline:
            res = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            if res.returncode == 0 and res.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"test cluster did not become idle in 60 s: {res.stdout} {res.stderr}; "
                           f"logs in {self.root / 'log'}")

    def _our_leftovers(self) -> list[int]:
        """PIDs (not ours) whose environment names this cluster's slurm.conf: job processes."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user=root"], check=False)
            deadline = time.time() + 45
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for pid in self._our_leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ---- client helpers ------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=60, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {res.returncode}: {res.stderr.strip()}")
        return res

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path = REPO) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=dict(self.env, **(env or {})), cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        return parse_kv(self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout)

    def wait_job(self, job_id: int, until, timeout: float, what: str = "condition") -> dict[str, str]:
        """Poll until `until(job_info)` is true; fail with the job's state and log on timeout."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: {what} not reached in {timeout} s; last state {info}")

    def wait_done(self, job_id: int, timeout: float) -> dict[str, str]:
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
        return self.wait_job(job_id, lambda j: j.get("JobState") in terminal, timeout, "a final state")

    def wait_idle(self, timeout: float = 90) -> None:
        """Until no job is queued or running and the node is idle (not still completing one)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            queue = self.run(["squeue", "-h"]).stdout.strip()
            if not queue and self.run(["sinfo", "-h", "-o", "%T"]).stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise AssertionError(f"cluster not idle after {timeout} s: {self.run(['squeue']).stdout}")

    def cancel_all(self) -> None:
        """Cancel every job (Slurm sends SIGCONT first, so stopped ranks die too) and wait."""
        self.run(["scancel", "--user=root"], check=False)
        self.wait_idle()

    def release_requeued(self, job_id: int, restarts: int = 1, timeout: float = 120,
                         extend_minutes: int | None = None) -> dict[str, str]:
        """Wait until the job is back in the queue after its n-th requeue, then start it now.

        Slurm holds a requeued job for about two minutes (Reason=BeginTime); that is
        deliberate Slurm behaviour and a test has no reason to sit through it.
        """
        info = self.wait_job(
            job_id, lambda j: j.get("JobState") == "PENDING" and j.get("Restarts") == str(restarts),
            timeout, f"PENDING after requeue {restarts}")
        # slurmd revokes the old attempt's credential when it ends and rejects any credential of
        # the same job created in or before that second ("Job credential revoked"): let the old
        # attempt finish on the node, then let the clock move on before starting the new one.
        deadline = time.time() + timeout
        while self.run(["sinfo", "-h", "-o", "%T"]).stdout.strip() != "idle":
            if time.time() > deadline:
                raise AssertionError(f"node not idle {timeout} s after requeuing job {job_id}")
            time.sleep(0.5)
        time.sleep(2)
        if extend_minutes:
            self.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={extend_minutes}"])
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        return info


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    ensure_slurm_installed()
    # A short root: slurmd's spool paths and munge's socket path must stay under ~100 chars.
    root = Path(tmp_path_factory.mktemp("slurm"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


class _Trainer:
    """What the cluster tests need to know about the program they launch.

    The tests run the real launch/train.py (RealTrainer). JANUS_CLUSTER_TRAINER=fake swaps in
    tests/cluster/fake_train.py, a stand-in that follows the same CLI contract in a fraction of
    the time: handy when changing the Slurm scripts or this harness.
    """

    entry: Path
    steps = (3, 4, 3)  # optimizer steps per stage
    interrupt_after = 4  # steps logged before a test interrupts a run (mid stage 2)
    fault_timeout_seconds = 15  # parallel.timeout_minutes for the fault tests

    def base_overrides(self, run_dir: Path) -> list[str]:
        raise NotImplementedError

    def overrides(self, run_dir: Path) -> list[str]:
        return [*self.base_overrides(run_dir), "checkpoint.every_steps=2",
                *(f"train.stages.stage{k}.steps={n}" for k, n in zip((1, 2, 3), self.steps))]

    def short_overrides(self, run_dir: Path) -> list[str]:
        """One step per stage: enough to prove a launch trains."""
        return [*self.base_overrides(run_dir), *(f"train.stages.stage{k}.steps=1" for k in (1, 2, 3))]

    def fault_overrides(self) -> list[str]:
        return [f"parallel.timeout_minutes={self.fault_timeout_seconds / 60}"]

    def job_env(self, pid_dir: Path | None = None) -> dict[str, str]:
        env = {"JANUS_DEVICE": "cpu", "JANUS_ENTRY": str(self.entry), "JANUS_PYTHON": sys.executable,
               "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        if pid_dir is not None:
            env["JANUS_PID_DIR"] = str(pid_dir)
        return env

    def expected_steps(self) -> list[tuple[int, int]]:
        """(stage, global step) of every step an uninterrupted run logs."""
        keys, step = [], 0
        for stage, n in zip((1, 2, 3), self.steps):
            for _ in range(n):
                step += 1
                keys.append((stage, step))
        return keys


class RealTrainer(_Trainer):
    entry = REPO / "launch" / "train.py"

    def __init__(self, shapes_root: Path):
        self.root = shapes_root

    def base_overrides(self, run_dir: Path) -> list[str]:
        return ["+recipe=tiny_demo", "model=tiny", "eval.data=null", f"run_dir={run_dir}", f"data.root={self.root}",
                f"model.init_from={self.root / 'tiny_init'}", "demo_assets.build=false",
                "logging.progress=false", "logging.wandb.enabled=false", "logging.sample_every=0",
                "data.num_workers=0", "checkpoint.export_hf=false"]

    def job_env(self, pid_dir: Path | None = None) -> dict[str, str]:
        # A tiny step takes ~0.3 s here; slowing it gives a signal time to land mid-run.
        return dict(super().job_env(pid_dir), JANUS_FAULT="step_sleep:1.0")

    def slow_env(self) -> dict[str, str]:
        """Steps of ~4.3 s: a 10-step run outlasts a signal that Slurm's timer may send late."""
        return {"JANUS_FAULT": "step_sleep:4.0"}

    def resumed_line(self, step: int | None) -> str:
        return "resuming from" if step is None else f"step_{step:08d} (stage"


class FakeTrainer(_Trainer):
    entry = Path(__file__).with_name("fake_train.py")

    def base_overrides(self, run_dir: Path) -> list[str]:
        return ["+recipe=tiny_demo", f"run_dir={run_dir}", "seed=0", "logging.wandb.enabled=false"]

    def job_env(self, pid_dir: Path | None = None) -> dict[str, str]:
        return dict(super().job_env(pid_dir), FAKE_STEP_SECONDS="0.3",
                    # A preemption save that outlasts a signal round trip: it proves that nothing
                    # (srun's own TERM handling included) kills a rank while it saves.
                    FAKE_PREEMPT_SAVE_SECONDS="3")

    def slow_env(self) -> dict[str, str]:
        return {"FAKE_STEP_SECONDS": "4.0"}

    def resumed_line(self, step: int | None) -> str:
        return "resumed from" if step is None else f"at step {step}"


@pytest.fixture(scope="session")
def trainer(request):
    if os.environ.get("JANUS_CLUSTER_TRAINER", "real") == "fake":
        return FakeTrainer()
    # The session's shapes dataset + tiny init checkpoint (tests/conftest.py), built once.
    return RealTrainer(request.getfixturevalue("shapes_root"))
