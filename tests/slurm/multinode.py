"""Several Slurm nodes on one kernel: one slurmctld and N slurmd, each slurmd a "node" of its own.

Inside the VM harness there is one kernel. ``MultiNodeCluster`` makes every node a set of namespaces
that a real node would have to itself:
- network: a network namespace ``sif-nodeK`` joined by a veth pair to a bridge (10.77.0.1/24 on the
  bridge, 10.77.0.1K in the node). The addresses exist only inside the VM, between namespaces made
  here; nothing routes them anywhere else.
- host name: a UTS namespace with the host name ``nodeK`` (what ``uname -n`` says on that node);
- mounts: a private mount namespace with a tmpfs of its own over the plugin's state directory
  (``/run/spank-sif``) and over the directory of the mount point, so each node has its own records
  and its own mount point. Not over all of ``/run``: munged's socket there serves every node (unix
  sockets are not per network namespace), as do the cluster's files under its root.
What the nodes share is what one kernel cannot split: device-mapper names and loop devices.

Everything else (configuration files, users, munge, plugstack, site config, running commands as a
user) is ``SlurmCluster``'s. Needs root and a kernel with network namespaces and veth (the VM).
"""
import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from engine_helpers import mappings  # noqa: F401 - the tests' one view of the kernel's mappings
from slurm import PREFIX, USERS, SlurmCluster, SlurmError, prepare_vm_node

BRIDGE = "sifbr0"
SUBNET = "10.77.0"
STATE_DIR = "/run/spank-sif"            # the plugin's default, per node
MOUNT_DIR = "/run/spank-sif-mnt"        # per node; holds the mount point
MOUNT_POINT = f"{MOUNT_DIR}/sif"


class Node:
    """One slurmd in namespaces of its own; ``pid`` is slurmd's (the namespaces' anchor)."""

    def __init__(self, index: int):
        self.name = f"node{index}"
        self.netns = f"sif-{self.name}"
        self.veth = f"sifv{index}"
        self.addr = f"{SUBNET}.{10 + index}"
        self.proc: subprocess.Popen | None = None

    def __repr__(self):
        return f"Node({self.name})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def path(self, path: str) -> Path:
        """``path`` as this node sees it (through its slurmd's root, in its mount namespace)."""
        return Path(f"/proc/{self.pid}/root{path}")

    def owns(self, pid: int) -> bool:
        """Whether process ``pid`` runs on this node (in its network namespace)."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/proc/{self.pid}/ns/net").st_ino
        except OSError:
            return False

    def run(self, argv, timeout=None) -> subprocess.CompletedProcess:
        """Run ``argv`` as root on this node (its network, UTS and mount namespaces)."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-n", "-u", "-m", *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)


def _override(conf: str, **settings) -> str:
    """``conf`` with the lines of each ``Key=`` replaced by the given line(s)."""
    for key, value in settings.items():
        lines = value if isinstance(value, list) else [f"{key}={value}"]
        conf = re.sub(rf"^{key}=.*$", "\n".join(lines), conf, count=1, flags=re.M)
    return conf


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class MultiNodeCluster(SlurmCluster):
    def __init__(self, root, nodes: int = 3):
        super().__init__(root)
        self.nodes = [Node(i) for i in range(1, nodes + 1)]
        self.state_dir = Path(STATE_DIR)
        self.mount_point = MOUNT_POINT
        self._hosts = None
        self.setup_seconds = None

    # -------------------------------------------------------------- set-up

    def write_configs(self) -> None:
        super().write_configs()
        conf = _override(
            self.conf.read_text(),
            SlurmctldHost=f"{self.host}({SUBNET}.1)",
            SlurmdPidFile=f"{self.root}/slurmd-%n.pid",
            SlurmdSpoolDir=f"{self.root}/spool/%n",
            SlurmdLogFile=f"{self.root}/log/slurmd-%n.log",
            NodeName=[f"NodeName={n.name} NodeAddr={n.addr} CPUs=2 RealMemory=1000 State=UNKNOWN"
                      for n in self.nodes])
        self.conf.write_text(conf)
        for node in self.nodes:
            (self.root / "spool" / node.name).mkdir(exist_ok=True)

    def network(self) -> None:
        """The bridge, a namespace and veth pair per node, and the names in /etc/hosts. (Tasks are
        told to reach srun at the bridge's address, though the guest's host name resolves to
        127.0.0.1 first: the order of these lines does not matter.)"""
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for node in self.nodes:
            _ip("netns", "add", node.netns)
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            _ip("link", "set", node.veth, "master", BRIDGE, "up")
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _ip("-n", node.netns, "link", "set", "eth0", "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
        hosts = Path("/etc/hosts")
        self._hosts = hosts.read_text()
        ours = [f"{SUBNET}.1 {self.host}"] + [f"{n.addr} {n.name}" for n in self.nodes]
        hosts.write_text(self._hosts + "".join(f"{line}\n" for line in ours))

    def start_node(self, node: Node) -> None:
        # `ip netns exec` gives a fresh /sys (for the namespace's network devices), which hides the
        # VM's cgroup2 mount: slurmd needs it back. exec keeps slurmd the Popen's process.
        script = (f"hostname {node.name} && mount -t cgroup2 none /sys/fs/cgroup"
                  f" && mount -t tmpfs -o mode=0700 spank-sif-state {STATE_DIR}"
                  f" && mount -t tmpfs -o mode=0755 spank-sif-mnt {MOUNT_DIR}"
                  f" && exec slurmd -D -N {node.name} -f {self.conf}")
        with open(self.root / "log" / f"slurmd-{node.name}.out", "wb") as out:
            node.proc = subprocess.Popen(
                ["ip", "netns", "exec", node.netns, "unshare", "--uts", "--mount",
                 "--propagation", "private", "sh", "-c", script],
                env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        self.procs[node.name] = node.proc

    def start(self, users=USERS) -> None:
        if os.environ.get("SPANK_SIF_IN_VM") != "1":
            raise SlurmError("the multi-node cluster changes the network set-up: only in the VM")
        began = time.monotonic()
        prepare_vm_node(self.host)
        self.network()
        for d in (STATE_DIR, MOUNT_DIR):  # the per-node tmpfs go over these
            os.makedirs(d, exist_ok=True)
        self.start_controller(users)
        for node in self.nodes:
            self.start_node(node)
        self.wait_idle()
        self.setup_seconds = time.monotonic() - began

    def node_states(self) -> dict[str, str]:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(),
                             capture_output=True, text=True, check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout=120) -> None:
        deadline = time.monotonic() + timeout
        states = {}
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}")
            states = self.node_states()
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            for name, state in states.items():
                if state.startswith("drain") or state == "down":
                    subprocess.run(["scontrol", "update", f"NodeName={name}", "State=RESUME"],
                                   env=self.env(), capture_output=True, check=False)
            time.sleep(0.3)
        raise SlurmError(f"nodes not idle after {timeout}s ({states}):\n"
                         + "\n".join(self.log(n.name)[-1500:] for n in self.nodes))

    def wait_jobs_done(self, timeout=120) -> None:
        """Until no job is queued and every node is idle again (epilogs done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True,
                               text=True, check=False)
            if not q.stdout.strip() and set(self.node_states().values()) == {"idle"}:
                return
            time.sleep(0.3)
        raise SlurmError(f"jobs still running or nodes not idle: {self.node_states()}")

    def stop(self) -> None:
        for node in self.nodes:
            proc = self.procs.pop(node.name, None)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc:
                try:
                    node.proc.wait(20)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
        super().stop()

    def cleanup(self) -> None:
        self.stop()
        for node in self.nodes:
            subprocess.run(["ip", "netns", "delete", node.netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
        if self._hosts is not None:
            Path("/etc/hosts").write_text(self._hosts)
        super().cleanup()

    # -------------------------------------------------------------- use

    def log(self, name: str) -> str:
        if name.startswith("node"):
            name = f"slurmd-{name}"
        return super().log(name)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill_step(self, node: Node, job: str, step: str = "0") -> list[int]:
        """SIGKILL the slurmstepd of ``job.step`` on ``node`` (a crash as the plugin sees it: no exit
        callback), then its tasks, which would otherwise hold the image. Returns the pids."""
        stepds = [pid for pid, argv in _processes()
                  if argv.startswith(f"slurmstepd: [{job}.{step}]") and node.owns(pid)]
        victims = stepds + [child for pid in stepds for child in _descendants(pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return victims

    # -------------------------------------------------------------- what is left (the system's view)

    def node_leftovers(self, node: Node) -> list[str]:
        """What only this node has: job directories in its state directory, and mounts in any mount
        namespace of its processes (slurmd's, stepds', tasks'): at its mount point (mount mode) or of
        a spank-sif mapping anywhere (a container's root is not at the mount point)."""
        found = [f"{node.name}: state {p.name}" for p in _dirs(node.path(STATE_DIR))]
        found += [f"{node.name}: mount in the namespace of pid {pid}" for pid, _ in _processes()
                  if node.owns(pid) and (_mounts_at(pid, self.mount_point) or _mapped_mounts(pid))]
        return found

    def mounted_mappings(self, node: Node) -> set[str]:
        """The spank-sif mappings mounted in any mount namespace of this node's processes, named
        by the kernel (each mount's device number, looked up in sysfs)."""
        return {name for pid, _ in _processes() if node.owns(pid) for name in _mapped_mounts(pid)}

    def leftovers(self) -> list[str]:
        """Every node's leftovers, and what the kernel holds for all: spank-sif mappings, loop
        devices over files of this cluster."""
        found = [f"mapping {name}" for name in mappings()]
        found += [f"loop {dev}: {backing}" for dev, backing in loops_under(self.root)]
        for node in self.nodes:
            found += self.node_leftovers(node)
        return found

    def wait_no_leftovers(self, timeout=60) -> list[str]:
        """Step teardown and epilogs finish after srun returns: wait for them."""
        self.wait_jobs_done()
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.3)
        return left


def removal_deferred(name: str) -> bool:
    """Whether someone asked device-mapper to remove ``name`` as soon as it is closed."""
    info = subprocess.run(["dmsetup", "info", name], capture_output=True, text=True, check=False).stdout
    return "DEFERRED REMOVE" in info


def loops_under(directory: Path) -> list[tuple[str, str]]:
    """(loop device, backing file) of every loop device over a file under ``directory``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip()
        except OSError:
            continue
        if path.startswith(f"{directory}/"):
            found.append((backing.parent.parent.name, path))
    return found


def _dirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def _processes() -> list[tuple[int, str]]:
    """(pid, command line with spaces) of every process."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry.name), argv))
    return found


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        todo += children
    return found


def _mapped_mounts(pid: int) -> set[str]:
    """Names of the spank-sif mappings that process ``pid``'s mount namespace has mounts of."""
    names = set()
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            devices = {line.split()[2] for line in f}
    except OSError:
        return names
    for device in devices:
        try:
            name = Path(f"/sys/dev/block/{device}/dm/name").read_text().strip()
        except OSError:
            continue
        if name.startswith("spank-sif-"):
            names.add(name)
    return names


def _mounts_at(pid: int, target: str) -> bool:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


# ------------------------------------------------------------------ jobs across the nodes

NODES = ("node1", "node2", "node3")


class Srun:
    """A background srun whose output lines are read by threads, so that waiting for them can
    time out (an srun can hang when a node's slurmstepd is gone)."""

    def __init__(self, cluster: SlurmCluster, argv, env):
        self.proc = cluster.spawn(argv, env=env)
        self.lines, self.errors = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.errors.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def take(self, count: int, timeout: float = 300) -> list[str]:
        lines, deadline = [], time.monotonic() + timeout
        while len(lines) < count:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"srun printed {lines}, then nothing (exit {self.proc.poll()}):\n"
                                     + "".join(self.errors))
            lines.append(line)
        return lines

    def finish(self, timeout: float = 300) -> int:
        """Its exit status; killed if it does not end in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def settle(probe, want, timeout: float = 60):
    """``probe()`` once it returns ``want`` (killed processes take a moment to go), or its last
    value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (got := probe()) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def check_own_mappings(nodes: dict[str, tuple[str, str]]) -> None:
    """``nodes``: node -> (mapping, loop device) as its tasks saw them. Three nodes, each with a
    mapping and a loop device of its own, named with that node's tag."""
    from spank_sif import lifecycle
    assert sorted(nodes) == list(NODES)
    names = [name for name, _ in nodes.values()]
    loops = [loop for _, loop in nodes.values()]
    assert len(set(names)) == 3 and len(set(loops)) == 3, nodes
    for node, (name, _) in nodes.items():
        assert lifecycle.parse_session_name(name)[1] == lifecycle.node_tag(node), (node, name)


def crash_node_and_run_its_epilog(cluster: "MultiNodeCluster", victim: Node,
                                  nodes: dict[str, tuple[str, str]]) -> str:
    """Kill ``victim``'s slurmstepd of the running job, then run that node's epilog by hand (Slurm
    would run it only when the whole job ends); check that the crash left the node's mapping and
    records and that the epilog removed them, loop device included. Returns the job id."""
    jid = cluster.run(["squeue", "-h", "-o", "%i"], user="root").stdout.split()[0]
    assert cluster.kill_step(victim, jid)
    crashed = [f"{victim.name}: state {jid}"]     # its tasks (and their mounts) went with it
    assert settle(lambda: cluster.node_leftovers(victim), crashed) == crashed
    name, loop = nodes[victim.name]
    assert name in mappings()
    epilog = victim.run([f"{PREFIX}/bin/spank-sif", "epilog", "--job", jid,
                         "--config", str(cluster.site_config)], timeout=300)
    assert epilog.returncode == 0, epilog.stderr
    assert cluster.node_leftovers(victim) == []
    assert name not in mappings()
    assert loop not in dict(loops_under(cluster.root))
    return jid


def check_untouched(cluster: "MultiNodeCluster", node: Node, jid: str, mapping: tuple[str, str]) -> None:
    """``node``'s mapping and loop device of job ``jid`` are still there, not marked for removal,
    and its records too."""
    name, loop = mapping
    assert name in mappings() and not removal_deferred(name), name
    assert loop in dict(loops_under(cluster.root))
    assert f"{node.name}: state {jid}" in cluster.node_leftovers(node)
