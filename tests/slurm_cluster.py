"""A real, throwaway single-node SLURM cluster for the tests: never a mock.

`SlurmCluster` starts, as root and without systemd, what a SLURM node runs: ``munged`` (as
the ``munge`` user, with a key generated for this cluster), ``slurmctld`` and ``slurmd``,
all from Debian's ``munge``, ``slurmctld``, ``slurmd`` and ``slurm-client`` packages. Its
``slurm.conf`` uses private ports, keeps state, spool, logs and sockets under a temporary
directory, tracks processes by their parents (``proctrack/linuxproc``, no cgroups) and
declares one node ``localhost`` with :data:`CPUS` CPUs (more than this machine has:
``SlurmdParameters=config_overrides``) and :data:`GPUS` fake GPUs (``Gres=gpu``, over empty
files standing for ``/dev/nvidia*``), in one partition, :data:`PARTITION`.

The clients (``sbatch``, ``squeue``, ``scontrol``, ``srun``) find the cluster through
``SLURM_CONF``: :meth:`SlurmCluster.env` is the environment to run them (and
``autometa launch slurm``) with. ``stop()`` always ends the daemons (each by its pid) and
deletes the directory; an ``atexit`` hook is the safety net for a run that never reaches it.

Only `subprocess` is used. :func:`missing` says why no cluster can start here (not root, a
binary missing), for a test's skip reason.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from limits import SLURM_START, SLURM_STOP

#: The programs a cluster needs (Debian: munge, slurmctld, slurmd, slurm-client).
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "sinfo",
         "scancel")
#: The one partition (the default).
PARTITION = "debug"
#: CPUs the node declares (each worker task takes one, unless told otherwise).
CPUS = 8
#: Fake GPUs the node declares (``Gres=gpu:3``): one for each of three workers.
GPUS = 3
#: The node's name (its address is 127.0.0.1).
NODE = "localhost"


def missing() -> str | None:
    """Why no cluster can start here (one line), or None."""
    if os.geteuid() != 0:
        return "starting SLURM needs root (slurmd runs jobs as their users)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None
              and not Path("/usr/sbin", tool).exists()]
    if absent:
        return (f"SLURM binaries missing ({', '.join(absent)}): apt-get install slurmctld "
                "slurmd slurm-client munge")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user (apt-get install munge creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie nobody reaps: munged is a
    daemon, the child of init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """A running single-node SLURM cluster (see the module docstring)."""

    def __init__(self) -> None:
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="autometa-slurm-"))
        os.chmod(self.root, 0o755)  # munge must reach its own directory below
        self.conf = self.root / "slurm.conf"
        self._daemons: list[subprocess.Popen[bytes]] = []
        self._munged_pid: Path | None = None
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    # -- life cycle -------------------------------------------------------------------------

    def _start(self) -> None:
        munge = self._start_munged()
        for name in ("state", "spool", "log", "run"):
            (self.root / name).mkdir()
        gpus = []
        for i in range(GPUS):
            # A GPU is a character device to slurmd (it only looks): /dev/null's numbers.
            dev = self.root / f"nvidia{i}"
            os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
            gpus.append(str(dev))
        (self.root / "gres.conf").write_text(
            f"NodeName={NODE} Name=gpu File={self.root}/nvidia[0-{GPUS - 1}]\n")
        self.conf.write_text("\n".join([
            "ClusterName=autometa-test",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's new start: the default 120 s is long.
            f"AuthInfo=socket={munge},cred_expire=5",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.root}/run/slurmctld.pid",
            f"SlurmdPidFile={self.root}/run/slurmd.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "GresTypes=gpu",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=30",
            "MailProg=/bin/true",
            # The scheduler looks at pending jobs every second, not every minute.
            "SchedulerParameters=sched_interval=1,defer_batch=0",
            f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=1000 "
            f"Gres=gpu:{GPUS} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._daemons.append(self._daemon("slurmctld", [_binary("slurmctld"), "-D", "-i"],
                                          "slurmctld.out"))
        self._daemons.append(self._daemon("slurmd", [_binary("slurmd"), "-D", "-N", NODE],
                                          "slurmd.out"))
        self._wait_idle()

    def _start_munged(self) -> Path:
        """munged as the munge user, with a fresh key, in a directory of its own."""
        home = self.root / "munge"
        home.mkdir(mode=0o700)
        key = home / "munge.key"
        key.write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge")
        key.chmod(0o400)
        for path in (home, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(home, 0o755)  # root's clients (sbatch, slurmd) reach the socket
        sock = home / "munge.socket"
        self._munged_pid = home / "munged.pid"
        subprocess.run(
            ["runuser", "-u", "munge", "--", _binary("munged"), f"--socket={sock}",
             f"--key-file={key}", f"--log-file={home}/munged.log",
             f"--pid-file={self._munged_pid}", f"--seed-file={home}/munged.seed"],
            check=True, capture_output=True, timeout=SLURM_START)
        return sock

    def _daemon(self, name: str, argv: list[str], out: str) -> subprocess.Popen[bytes]:
        with open(self.root / "log" / out, "wb") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + SLURM_START
        state = ""
        while time.monotonic() < deadline:
            for daemon in self._daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"{daemon.args[0]} exited ({daemon.returncode}):\n"
                                       + self.logs())
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(),
                                    capture_output=True, text=True, timeout=SLURM_START)
            state = result.stdout.strip()
            if result.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node is not idle after {SLURM_START} s (state "
                           f"{state!r}):\n" + self.logs())

    def logs(self) -> str:
        """The daemons' logs (the tail of each), for a failure's message."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def _cancel_jobs(self) -> None:
        """Cancel every job left (a failed test's), and wait until none is left: slurmd's
        end does not end the job steps it started."""
        deadline = time.monotonic() + SLURM_STOP
        while time.monotonic() < deadline:
            listed = subprocess.run(["squeue", "-h", "-o", "%A"], env=self.env(),
                                    capture_output=True, text=True, timeout=SLURM_STOP)
            jobs = listed.stdout.split()
            if listed.returncode != 0 or not jobs:
                return
            subprocess.run(["scancel", "--full", *jobs], env=self.env(), capture_output=True,
                           timeout=SLURM_STOP)
            time.sleep(0.5)

    def env(self) -> dict[str, str]:
        """This process's environment plus ``SLURM_CONF`` pointing at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def stop(self) -> None:
        """End the daemons (each by its pid: slurmd's jobs first) and delete the directory.
        Safe to call twice."""
        atexit.unregister(self.stop)
        if self._daemons and all(d.poll() is None for d in self._daemons):
            self._cancel_jobs()
        for daemon in reversed(self._daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=SLURM_STOP)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        self._daemons = []
        if self._munged_pid is not None and self._munged_pid.exists():
            try:
                pid = int(self._munged_pid.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
            else:  # munged writes its seed file as it ends: let it, before the directory goes
                deadline = time.monotonic() + SLURM_STOP
                while not _ended(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
            self._munged_pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
