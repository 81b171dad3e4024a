"""A real single-node Slurm (Debian's slurmctld, slurmd and munge) for the plugin's tests.

``SlurmCluster(root)`` writes slurm.conf, cgroup.conf, plugstack.conf and the plugin's site config
under ``root`` (world-readable: jobs run as ordinary users), starts munged if none answers, then
slurmctld and slurmd in the foreground as children of the test process, on ports of their own so
they never collide with a system Slurm. Jobs are submitted as the test users ``sifuser`` and
``sifother`` (created with useradd when missing). Needs root. Used on the host and inside the VM.
"""
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

USERS = ("sifuser", "sifother")
PREFIX = os.environ.get("SPANK_SIF_PREFIX", "/opt/spank-sif")

SLURM_CONF = """\
ClusterName=sifci
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmdDebug=verbose
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PlugStackConfig={root}/etc/plugstack.conf
Prolog={root}/etc/prolog
Epilog={root}/etc/epilog
ReturnToService=2
KillWait=2
MinJobAge=2
InactiveLimit=0
SlurmdTimeout=30
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""

# The job's prolog and epilog keep what Slurm hands them (the job-control environment, SPANK_*
# variables included) where the tests look: log/<prolog|epilog>-env.<job id>.
JOB_SCRIPT = """#!/bin/sh
umask 077
env > {root}/log/{name}-env.$SLURM_JOB_ID
exit 0
"""

# Pure cgroup v2 (the VM) needs the v2 plugin without systemd; a hybrid host (v1 controllers,
# as on the development machines) only works with v1. Nothing here uses cgroups otherwise.
CGROUP_CONF = ("CgroupPlugin=cgroup/v2\nIgnoreSystemd=yes\n"
               if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "CgroupPlugin=cgroup/v1\n")


class SlurmError(RuntimeError):
    pass


def _free_port() -> int:
    # Ports of our own: a system Slurm, or another test's cluster, may hold the default ones.
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ensure_users(names=USERS) -> None:
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(
            ["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_munge() -> None:
    if _munge_works():
        return
    munge = pwd.getpwnam("munge")
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(d, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    subprocess.run(["/usr/sbin/munged"], user="munge", group="munge", check=True)
    for _ in range(50):
        if _munge_works():
            return
        time.sleep(0.1)
    raise SlurmError("munged does not answer")


def prepare_vm_node(host: str) -> None:
    """Inside the VM harness's guest (no NIC, bare cgroup2, no systemd): what Slurm needs
    (docs/testing.md, "Slurm inside the VM"). Idempotent."""
    hosts = Path("/etc/hosts")
    if not Path("/sys/class/net/sv0").exists():
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "sv0", "type", "dummy"],
                    ["ip", "addr", "add", "169.254.77.1/32", "dev", "sv0"],
                    ["ip", "link", "set", "sv0", "up"]):
            subprocess.run(cmd, check=True)
    if f"169.254.77.1 {host}" not in hosts.read_text():
        with hosts.open("a") as f:
            f.write(f"169.254.77.1 {host}\n")
    cg = Path("/sys/fs/cgroup")
    if not (cg / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(cg)], check=True)
    (cg / "system.slice").mkdir(exist_ok=True)
    wanted = [c for c in ("cpu", "memory", "pids", "cpuset")
              if c in (cg / "cgroup.controllers").read_text().split()]
    (cg / "cgroup.subtree_control").write_text(" ".join("+" + c for c in wanted))


class SlurmCluster:
    def __init__(self, root):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.plugstack = self.root / "etc" / "plugstack.conf"
        self.site_config = self.root / "etc" / "spank_sif.yaml"
        self.state_dir = self.root / "run-state"
        self.procs = {}
        self.ports = (_free_port(), _free_port())

    # -------------------------------------------------------------- set-up

    def write_configs(self) -> None:
        for d in ("etc", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "etc", 0o755)
        self.conf.write_text(SLURM_CONF.format(host=self.host, root=self.root, cpus=os.cpu_count(),
                                               ctld_port=self.ports[0], slurmd_port=self.ports[1]))
        (self.root / "etc" / "cgroup.conf").write_text(CGROUP_CONF)
        for name in ("prolog", "epilog"):
            script = self.root / "etc" / name
            script.write_text(JOB_SCRIPT.format(root=self.root, name=name))
            os.chmod(script, 0o755)
        self.write_site_config("")
        self.set_plugin(True)

    def plugstack_line(self, extra=()) -> str:
        out = subprocess.run([f"{PREFIX}/bin/spank-sif", "plugstack-line", "--config",
                              str(self.site_config), "--state-dir", str(self.state_dir)],
                             capture_output=True, text=True, check=True)
        overridden = {word.split("=", 1)[0] + "=" for word in extra}
        words = [w for w in out.stdout.split() if not w.startswith(tuple(overridden))]
        return " ".join([*words, *extra])

    def set_plugin(self, enabled: bool, extra=()) -> None:
        """Load the plugin (or not) in srun/sbatch/stepd from now on (they re-read plugstack.conf;
        slurmd keeps the copy it read at start for the epilog)."""
        self.plugstack.write_text(self.plugstack_line(extra) + "\n" if enabled else "")
        os.chmod(self.plugstack, 0o644)

    def write_site_config(self, yaml_text: str) -> None:
        """The plugin's site configuration; state_dir always points at this cluster's."""
        text = f"state_dir: {self.state_dir}\n{yaml_text}"
        self.site_config.write_text(text)
        os.chmod(self.site_config, 0o644)

    def start(self, users=USERS) -> None:
        """Start the daemons (after creating the test ``users`` where missing)."""
        if os.environ.get("SPANK_SIF_IN_VM") == "1":
            prepare_vm_node(self.host)
        self.start_controller(users)
        with open(self.root / "log" / "slurmd.out", "wb") as out:
            self.procs["slurmd"] = subprocess.Popen(
                ["slurmd", "-D", "-f", str(self.conf), "-N", self.host], env=self.env(),
                stdout=out, stderr=subprocess.STDOUT)
        self.wait_idle()

    def start_controller(self, users=USERS) -> None:
        """The test ``users`` (where missing), munge, the configuration files and slurmctld: what
        the nodes need first."""
        ensure_users(users)
        ensure_munge()
        self.write_configs()
        with open(self.root / "log" / "slurmctld.out", "wb") as out:
            self.procs["slurmctld"] = subprocess.Popen(
                ["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env(),
                stdout=out, stderr=subprocess.STDOUT)

    def wait_idle(self, timeout=60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}")
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(),
                                 capture_output=True, text=True)
            state = out.stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            if state.startswith("drain") or state == "down":
                subprocess.run(["scontrol", "update", f"NodeName={self.host}", "State=RESUME"],
                               env=self.env(), capture_output=True)
            time.sleep(0.3)
        raise SlurmError(f"node not idle after {timeout}s (state {state!r}):\n"
                         f"{self.log('slurmd')[-3000:]}")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.pop(name, None)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # -------------------------------------------------------------- use

    def env(self, user: str = "root", **extra) -> dict:
        entry = pwd.getpwnam(user)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "SLURM_CONF": str(self.conf),
               "HOME": entry.pw_dir, "USER": user, "LOGNAME": user, "LANG": "C.UTF-8"}
        env.update(extra)
        return env

    def run(self, argv, user="sifuser", env=None, timeout=None, cwd=None, input=None, check=False):
        """Run a Slurm command as ``user``; returns the CompletedProcess (text). The VM emulates its
        CPU (and shares the machine): commands there get more time."""
        timeout = timeout or (300 if os.environ.get("SPANK_SIF_IN_VM") == "1" else 90)
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                                check=False, **self._as_user(user, env, cwd))
        if check and result.returncode != 0:
            raise SlurmError(f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def spawn(self, argv, user="sifuser", env=None, cwd=None) -> subprocess.Popen:
        """Start a Slurm command as ``user`` in the background; stdout and stderr are pipes (text)."""
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **self._as_user(user, env, cwd))

    def _as_user(self, user: str, env, cwd) -> dict:
        """subprocess arguments that run a command as ``user`` (uid, gid, groups), with this
        cluster's environment plus ``env``, in ``cwd`` (default: the user's home)."""
        entry = pwd.getpwnam(user)
        full_env = self.env(user)
        full_env.update(env or {})
        kwargs = {"env": full_env, "cwd": cwd or entry.pw_dir}
        if user != "root":
            kwargs.update(user=entry.pw_uid, group=entry.pw_gid,
                          extra_groups=[g.gr_gid for g in grp.getgrall() if user in g.gr_mem])
        return kwargs

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        out = self.root / "log" / f"{name}.out"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text + (out.read_text(errors="replace") if out.exists() else "")

    def wait_jobs_done(self, timeout=60) -> None:
        """Until no job is left in the queue and the node is idle again (epilogs done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True,
                               text=True)
            node = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(),
                                  capture_output=True, text=True)
            if not q.stdout.strip() and node.stdout.strip() == "idle":
                return
            time.sleep(0.2)
        raise SlurmError("jobs still running or node not idle")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
