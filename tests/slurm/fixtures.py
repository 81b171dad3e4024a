"""pytest fixtures and checks for the real-Slurm tests (host and VM).

``slurm_cluster``: one single-node Slurm per test session, the installed plugin in its plugstack.
``slurm_cluster3``: three Slurm nodes on the VM's one kernel (slurm/multinode.py), one per test module
(two at once cannot share the VM's network set-up).
``plain_images``: small SIF images made here (squashfs, no dm-crypt needed) in a world-readable dir.
``leftovers(cluster)``: whatever a job left on the node (loop devices, mounts, mappings, records).
``buggy_python``: the plugin's Python with a bug injected into the callback it is told to break
(``break_callback("remote:task_init_privileged")``).
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import reftools
from engine_helpers import mappings
from slurm import SlurmCluster
from slurm.multinode import MultiNodeCluster
from spank_sif import sif
from spank_sif.callbacks import INTERNAL_ERROR, INTERNAL_ERROR_SUBMIT

HELLO = b"hello from a plain SIF\n"


def _require_slurm() -> None:
    if os.geteuid() != 0:
        pytest.skip("real-Slurm tests start slurmctld/slurmd and need root")
    missing = [tool for tool in ("slurmctld", "slurmd", "srun", "munged") if not shutil.which(
        tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        pytest.fail(f"Slurm tools missing: {', '.join(missing)} (scripts/install.sh)")


@pytest.fixture(scope="session")
def slurm_cluster():
    _require_slurm()
    # $TMPDIR: a tmpfs in the VM (loop devices and cryptsetup want no 9p or overlay underneath).
    root = Path(tempfile.mkdtemp(prefix="spank-sif-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


# Module scope: a session fixture imported into two modules would be set up once per module and
# kept until the session ends, so two clusters would claim the same bridge and namespaces.
@pytest.fixture(scope="module")
def slurm_cluster3(request, record_testsuite_property):
    _require_slurm()
    if os.environ.get("SPANK_SIF_IN_VM") != "1":
        pytest.skip("the three-node cluster adds a bridge, network namespaces and /etc/hosts lines: "
                    "it runs only in the VM harness's throwaway guest (SPANK_SIF_VM=force)")
    root = Path(tempfile.mkdtemp(prefix="spank-sif-slurm3-"))
    cluster = MultiNodeCluster(root, nodes=3)
    try:
        cluster.start()
        # In the JUnit report (the VM run's vm.xml): how long the cluster took to start.
        record_testsuite_property(f"slurm_cluster3_start_seconds {request.module.__name__}",
                                  f"{cluster.setup_seconds:.1f}")
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def cluster(slurm_cluster):
    """The session's cluster with the plugin loaded and a default site config, restored after."""
    slurm_cluster.set_plugin(True)
    slurm_cluster.write_site_config(site_yaml(slurm_cluster))
    yield slurm_cluster
    slurm_cluster.run(["scancel", "--full", "-u", "sifuser"], user="root")
    slurm_cluster.run(["scancel", "--full", "-u", "sifother"], user="root")
    slurm_cluster.wait_jobs_done()
    slurm_cluster.set_plugin(True)
    slurm_cluster.write_site_config(site_yaml(slurm_cluster))


def site_yaml(cluster, extra: str = "", submit_check: str = "off") -> str:
    """The site configuration of a test. The submit check is off unless a test asks for it, so that
    what a test sends to the node reaches the node (tests/test_submit_check.py tests the check)."""
    return f"mount_point: {cluster.root / 'sif'}\nsubmit_check: {submit_check}\n{extra}"


def mount_point(cluster) -> str:
    return str(cluster.root / "sif")


def write_image(path: Path, partition: bytes, fs_type=sif.FsType.SQUASHFS, mode=0o644) -> Path:
    sif.write_sif(str(path), sif.apptainer_layout(partition, fs_type))
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="session")
def plain_images(slurm_cluster):
    """Images every test user can reach (the cluster root is 0755), by name."""
    d = slurm_cluster.root / "images"
    d.mkdir(mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    squashfs = reftools.make_squashfs(d / "tree", d / "rootfs.sqfs", {"hello.txt": HELLO}).read_bytes()
    encrypted = reftools.luks_encrypt_payload(d / "rootfs.sqfs", d / "payload.luks", b"secret-pass")
    images = {
        "plain": write_image(d / "plain.sif", squashfs),
        "root_only": write_image(d / "root-only.sif", squashfs, mode=0o600),
        "not_sif": d / "not-a-sif.sif",
        "gocryptfs": write_image(d / "gocryptfs.sif", squashfs, sif.FsType.GOCRYPTFS_SQUASHFS),
        "encrypted": write_image(d / "encrypted.sif", encrypted.read_bytes(),
                                 sif.FsType.ENCRYPTED_SQUASHFS),
    }
    images["not_sif"].write_bytes(b"#!/bin/sh\necho I am not a SIF image\n" * 10)
    os.chmod(images["not_sif"], 0o644)
    allowed = d / "allowed"
    allowed.mkdir(mode=0o755, exist_ok=True)
    images["allowed"] = allowed
    return images


FAULT_MODULE = """\
# Injected by the test suite (tests/slurm/fixtures.py): the callback named in the file 'fault' next
# to this venv ("<context>:<callback>", e.g. remote:user_init) raises, as a bug in spank-sif would.
import os
import spank_sif.callbacks as callbacks

_FAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))),
                      "fault")


def _broken(handler, name):
    def handler_with_a_bug(sp, args):
        with open(_FAULT) as f:
            if f.read().strip() == name:
                raise RuntimeError("injected bug in " + name + " \\x1b[31m(traceback marker)")
        return handler(sp, args)
    return handler_with_a_bug


for key, handler in list(callbacks.HANDLERS.items()):
    callbacks.HANDLERS[key] = _broken(handler, ":".join(key))
"""


class BuggyPython:
    """A second virtual environment of the plugin's own base interpreter that sees the installed
    package and, at start-up (a .pth file), wraps every callback handler: the one named by
    ``break_callback`` ("<context>:<callback>") raises. Point the plugstack line's python= at ``python``. Nothing of the
    installed plugin changes: Slurm loads the same shared object."""

    def __init__(self, root: Path):
        self.root = root
        self.python = root / "bin" / "python3"
        self.fault = root / "fault"

    def create(self, prefix: str) -> "BuggyPython":
        home = next(line.split("=", 1)[1].strip() for line in open(f"{prefix}/pyvenv.cfg")
                    if line.startswith("home"))
        subprocess.run([f"{home}/python3", "-m", "venv", "--without-pip", str(self.root)], check=True)
        (site,) = self.root.glob("lib/python3*/site-packages")
        (installed,) = Path(prefix).glob("lib/python3*/site-packages")
        (site / "spank_sif_fault.py").write_text(FAULT_MODULE)
        # One .pth: the installed packages join sys.path, then the fault module runs.
        (site / "zz_spank_sif_fault.pth").write_text(f"{installed}\nimport spank_sif_fault\n")
        self.break_callback("")
        subprocess.run(["chmod", "-R", "a+rX", str(self.root)], check=True)
        return self

    def break_callback(self, name: str) -> None:
        self.fault.write_text(name + "\n")
        os.chmod(self.fault, 0o644)


@pytest.fixture(scope="session")
def buggy_python(slurm_cluster):
    from slurm import PREFIX
    return BuggyPython(slurm_cluster.root / "buggy-python").create(PREFIX)


def sif_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "sif-image:" in line]


def assert_one_error(result, *words) -> str:
    """The user saw exactly one 'sif-image:' line naming the expected cause (every one of
    ``words``, at least one), and the job failed. The line a crash gives (INTERNAL_ERROR on a node,
    INTERNAL_ERROR_SUBMIT in srun/sbatch) is never an expected refusal: a bug must not pass for one."""
    assert words, "name the expected cause: without words any single line would pass"
    lines = sif_lines(result.stderr)
    assert result.returncode != 0, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sif-image: "), lines[0]
    assert not any(crash in lines[0] for crash in (INTERNAL_ERROR, INTERNAL_ERROR_SUBMIT)), \
        f"a crash, not a refusal: {lines[0]}"
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def looks_for_the_mount(cluster) -> str:
    """A task that says who ran it, what the mount point holds and how many mounts there are at
    it, and exits 0 whatever it finds (grep -c exits 1 on no match)."""
    target = mount_point(cluster)
    return (f'echo "looked as $(id -un)"; echo "entries: $(ls -A {target} 2>&1 | tr "\\n" " ")"; '
            f'echo "mounts: $(grep -c " {target} " /proc/self/mountinfo)"')


def assert_saw_nothing(result, user) -> None:
    """The other user's job ran (exit 0, its own lines printed) and saw no mount and no file: a job
    that failed to run would otherwise pass for one that saw nothing."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:1] == [f"looked as {user}"], result.stdout
    assert "entries: " in lines and "mounts: 0" in lines, result.stdout


def leftovers(cluster) -> list[str]:
    """Loop devices over files of this cluster, mounts at its mount point in any mount namespace,
    spank-sif device-mapper nodes, and state records: after a job ends, all must be gone."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if str(cluster.root) in backing.read_text():
                found.append(f"loop {backing.parent.parent.name}: {backing.read_text().strip()}")
        except OSError:
            pass
    target = f" {mount_point(cluster)} "
    for info in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            if target in info.read_text():
                found.append(f"mount in the namespace of pid {info.parent.name}")
        except OSError:
            pass
    found += [f"mapping {name}" for name in mappings()]  # the kernel's list, whatever /dev shows
    if cluster.state_dir.exists():  # per-job directories (node-wide files, e.g. KDF locks, stay)
        found += [f"state {p.relative_to(cluster.state_dir)}" for p in cluster.state_dir.iterdir()
                  if p.is_dir()]
    return found


def wait_no_leftovers(cluster, timeout=30) -> list[str]:
    """Step teardown (remote exit) and the epilog run after srun returns: wait for them."""
    cluster.wait_jobs_done()
    deadline = time.monotonic() + timeout
    while (left := leftovers(cluster)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_step(cluster, step="0") -> None:
    """SIGKILL the slurmstepd of step ``step`` of the only running job (a node crash as the plugin
    sees it: no exit callback), then its tasks, which would otherwise hold the image."""
    job = cluster.run(["squeue", "-h", "-o", "%i"], user="root").stdout.split()
    assert len(job) == 1, job
    listed = cluster.run(["scontrol", "listpids", f"{job[0]}.{step}"], user="root").stdout
    tasks = [int(line.split()[0]) for line in listed.splitlines()[1:] if line.split()[0].isdigit()]
    stepds = subprocess.run(["pgrep", "-f", rf"^slurmstepd: \[{job[0]}\.{step}\]"],
                            capture_output=True, text=True).stdout.split()
    assert stepds and tasks, (stepds, listed)
    for pid in [int(p) for p in stepds] + tasks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
