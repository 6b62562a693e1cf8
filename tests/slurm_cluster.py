"""A one-node SLURM cluster on localhost for the scheduler tests: Debian's ``slurm-wlm`` and
``munge``, ``slurmctld`` and ``slurmd`` as root (``proctrack/linuxproc``, ``task/none``, no
cgroups), ``munged`` as user munge with the packaged key. Everything lives in one temporary
directory; :meth:`LocalSlurm.stop` ends each daemon it started, by its pid.

    python tests/slurm_cluster.py   # start one, print its SLURM_CONF, stop it on Enter
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "srun")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing() -> Optional[str]:
    """Why a local cluster cannot start here, or None."""
    absent = [p for p in DAEMONS if not Path(p).is_file()]
    absent += [c for c in CLIENTS if shutil.which(c) is None]
    if absent:
        return (f"SLURM not installed ({', '.join(absent)} missing): "
                "apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        return "the local SLURM cluster runs slurmctld/slurmd as root"
    if not MUNGE_KEY.is_file():
        return f"{MUNGE_KEY} missing (the munge package creates it)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """One controller and one node (this host, all its CPUs) in a temporary directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="m2-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.node = socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict:
        """The environment for clients (sbatch, scontrol, ...) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        munge = r / "munge"
        cpus = os.cpu_count() or 1
        mem = max(int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20) // 2,
                  256)
        (r / "state").mkdir()
        (r / "spool").mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=m2test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge / 'munge.socket'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",
            "MailProg=/bin/true",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start(self, timeout: float = 60) -> "LocalSlurm":
        """Start munged, slurmctld and slurmd; return once the node takes jobs."""
        self._write_conf()
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)
        user = pwd.getpwnam("munge")
        os.chown(munge, user.pw_uid, user.pw_gid)
        self._spawn([DAEMONS[0], "-F",
                     f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}",
                     f"--key-file={MUNGE_KEY}"], user="munge")
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged")
        self._spawn([DAEMONS[1], "-D", "-i", "-f", str(self.conf)])
        self._spawn([DAEMONS[2], "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, timeout, "slurmd to register")
        return self

    def _spawn(self, cmd: list[str], user: Optional[str] = None) -> None:
        with open(self.root / (Path(cmd[0]).name + ".out"), "ab") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True, user=user,
                                               group=user))

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True,
                           text=True)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mix")

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0][0]} exited; logs in {self.root}")
            if ok():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}; logs in {self.root}")

    def stop(self) -> None:
        """End every daemon this object started (by pid, newest first), then remove its
        directory."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    why = missing()
    if why:
        raise SystemExit(why)
    c = LocalSlurm().start()
    print(f"export SLURM_CONF={c.conf}")
    try:
        input("Enter stops the cluster ")
    finally:
        c.stop()
