"""A throw-away single-node Slurm cluster for tests: munged, slurmctld and slurmd as root, no systemd, no
accounting, everything (config, keys, sockets, state, logs) in one folder.

    python tests/slurm/cluster.py start DIR     # prints `export SLURM_CONF=DIR/slurm.conf`
    python tests/slurm/cluster.py stop DIR

Needs the Debian packages slurmctld, slurmd, slurm-client and munge, root, and free ports 6817/6818 on
loopback (one such cluster per machine). Daemons are stopped by their recorded PIDs, never by name.

The config is also linked as /etc/slurm/slurm.conf (and cgroup.conf) while the cluster runs: Snakemake's
Slurm job steps drop SLURM_CONF from the environment of their inner `srun`, which then reads the default
location. A slurm.conf that is already there is never replaced.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "srun")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order: workers first
SYSTEM_CONFIG = Path("/etc/slurm")
TEMPLATE = Path(__file__).with_name("slurm.conf.in")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def node_line(hostname: str) -> str:
    """The node's hardware as `slurmd -C` reports it, with RealMemory lowered to 85 % (Slurm drains a node
    that reports less memory than configured)."""
    detected = subprocess.run([binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in detected.split()[:8] if "=" in item)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    hardware = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    memory = int(int(fields.get("RealMemory", "2000")) * 0.85)
    return f"NodeName={hostname} NodeAddr=127.0.0.1 {hardware} RealMemory={memory} State=UNKNOWN"


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        hostname = socket.gethostname().split(".")[0]
        try:
            socket.gethostbyname(hostname)
        except OSError:
            raise RuntimeError(f"host name {hostname!r} does not resolve: add '127.0.0.1 {hostname}' to "
                               "/etc/hosts") from None
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        # munged refuses a key that is not private to its user, and a socket folder others cannot enter.
        self.root.chmod(0o711)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        text = TEMPLATE.read_text().format(root=self.root, host=hostname, node=node_line(hostname))
        self.conf.write_text(text)
        (self.root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        SYSTEM_CONFIG.mkdir(exist_ok=True)
        for name in ("slurm.conf", "cgroup.conf"):
            link = SYSTEM_CONFIG / name
            if link.is_symlink() and not link.exists():  # left behind by a test cluster that was killed
                link.unlink()
            if link.exists() or link.is_symlink():
                raise RuntimeError(f"{link} already exists: this machine has a Slurm configuration, which the "
                                   "test cluster will not replace; run the test on a machine without one")
            link.symlink_to(self.root / name)

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        root = self.root
        self._run(binary("munged"), f"--key-file={root}/munge.key", f"--socket={root}/munge.socket",
                  f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log",
                  f"--seed-file={root}/munged.seed")
        self._run(binary("slurmctld"), "-c", "-f", str(self.conf))   # -c: clean start, no saved state
        self._run(binary("slurmd"), "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            if state.stdout.strip() == "idle":
                break
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"the Slurm node did not become idle; see {root}/log")
        # sinfo says idle for a while even if slurmd died: prove the node runs jobs.
        check = subprocess.run(["timeout", "-k", "5", "30", "srun", "true"], capture_output=True, text=True,
                               env=self.env)
        if check.returncode != 0:
            self.stop()
            raise RuntimeError(f"`srun true` failed on the test cluster: {check.stderr}; see {root}/log")

    def stop(self) -> None:
        subprocess.run(["timeout", "-k", "5", "20", "scancel", "--user", str(os.getuid())], env=self.env,
                       capture_output=True)
        pids = []
        for daemon in DAEMONS:
            pid_file = self.root / f"{daemon}.pid"
            if pid_file.is_file() and pid_file.read_text().strip().isdigit():
                pids.append(int(pid_file.read_text()))
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for name in ("slurm.conf", "cgroup.conf"):
            link = SYSTEM_CONFIG / name
            if link.is_symlink() and os.readlink(link) == str(self.root / name):
                link.unlink()

    def _run(self, *command: str) -> None:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr}; see {self.root}/log")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    cluster = Cluster(Path(sys.argv[2]))
    if sys.argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
