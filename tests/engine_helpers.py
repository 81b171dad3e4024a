"""Shared by the node-engine tests (host and VM): test users, world-readable work directories,
images, running the CLI, and the "nothing left behind" check."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import reftools

USER = "sifuser1"      # the job's user in engine tests (distinct from the plugin tests' users)
OTHER = "sifuser2"     # another ordinary user
GROUP = "sifgrp1"      # a supplementary group of USER only


def ensure_users() -> None:
    """Create the engine tests' users and group once (idempotent; on the host or in the VM)."""
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", GROUP], check=True, capture_output=True)
    for name, extra in ((USER, ["-G", GROUP]), (OTHER, [])):
        if subprocess.run(["id", name], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", *extra, name],
                           check=True, capture_output=True)


def world_dir(prefix: str = "sif-engine-") -> Path:
    """A directory every user can traverse (pytest's tmp_path is root-only)."""
    base = os.environ.get("SPANK_SIF_VM_WORK") or "/tmp"  # in the VM: its tmpfs
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    return path


def write_config(path: Path, **settings) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(settings))
    return path


def plain_image(dir: Path, files: dict[str, bytes] | None = None) -> Path:
    """A plain (unencrypted squashfs) SIF built by mksquashfs and the reference SIF library."""
    files = files or {"hello.txt": b"hello from a plain image\n", "opt/data.bin": os.urandom(200_000)}
    tree = dir / "tree"
    sqfs = reftools.make_squashfs(tree, dir / "root.sqfs", files)
    image = reftools.sifref_build(dir / "plain.sif", sqfs, fs="squashfs")
    shutil.rmtree(tree)
    sqfs.unlink()
    image.chmod(0o644)
    return image


def cli(*argv, env=None, check=False, timeout=120) -> subprocess.CompletedProcess:
    """``spank-sif ARGV`` as root, in a fresh process (the way admins and the epilog run it)."""
    full_env = {k: v for k, v in os.environ.items() if k != "SPANK_SIF_KILL_AT"}
    full_env.update(env or {})
    repo = str(Path(__file__).resolve().parent.parent)
    full_env["PYTHONPATH"] = repo + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "spank_sif", *map(str, argv)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"spank-sif {' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr}")
    return proc


def _child_run(fn, args, env, write_end) -> None:
    import pickle
    code = 0
    try:
        os.environ.update(env or {})
        result = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result, code = f"{type(exc).__name__}: {exc}", 1
    try:
        with os.fdopen(write_end, "wb") as out:
            pickle.dump(result, out)
    finally:
        os._exit(code)


def in_children(calls, env: dict | None = None, started=None) -> list:
    """Run each ``(fn, *args)`` of ``calls`` at once, each in a forked child (modules already
    imported: cheap under emulation); return ``(status, result)`` per call: status is the exit code,
    or minus the signal that killed the child; result is what ``fn`` returned, or
    ``"<ErrorClass>: message"`` if it raised. ``started(pids)`` is called once all are forked (to
    watch them from outside)."""
    import pickle
    children = []
    for fn, *args in calls:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child_run(fn, args, env, write_end)
        os.close(write_end)
        children.append((pid, read_end))
    if started is not None:
        started([pid for pid, _ in children])
    out = []
    for pid, read_end in children:
        with os.fdopen(read_end, "rb") as inp:
            data = inp.read()
        _, status = os.waitpid(pid, 0)
        out.append((os.waitstatus_to_exitcode(status), pickle.loads(data) if data else None))
    return out


def in_child(fn, *args, env: dict | None = None):
    """``in_children`` for one call."""
    return in_children([(fn, *args)], env)[0]


def _address_space() -> int:
    """This process's virtual memory size in bytes (what RLIMIT_AS counts)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def measured(fn, *args, headroom: int | None = None, timeout: float = 600.0, env: dict | None = None,
             during=None):
    """Run ``fn(*args)`` in a forked child, as ``in_child`` does, and watch it from outside:
    ``(status, result, seconds, max_rss_kib)``. ``headroom``: the child may map at most this many
    bytes beyond what it inherited (RLIMIT_AS), so an allocation above it fails (ENOMEM) instead of
    happening. ``during(pid)``: what the parent does meanwhile. After ``timeout`` seconds the child
    is killed (status -9, result "timeout")."""
    import pickle
    import resource
    import signal
    read_end, write_end = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        if headroom is not None:
            limit = _address_space() + headroom
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        _child_run(fn, args, env, write_end)
    os.close(write_end)
    if during is not None:
        try:
            during(pid)
        except BaseException:
            os.kill(pid, signal.SIGKILL)  # still a child (a zombie at worst): nothing reaped it
            os.waitpid(pid, 0)
            os.close(read_end)
            raise
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            os.close(read_end)
            return -9, "timeout", time.monotonic() - start, usage.ru_maxrss
        time.sleep(0.02)
    seconds = time.monotonic() - start
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    return (os.waitstatus_to_exitcode(status), pickle.loads(data) if data else None, seconds,
            usage.ru_maxrss)


def attached_loops() -> set[str]:
    """The loop devices that are attached, as ``losetup`` reports them."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME"],
                         capture_output=True, text=True, check=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def loops_backed_by(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image``, as ``losetup`` reports them."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True)
    want = os.path.realpath(image)
    found = []
    for line in out.stdout.splitlines():
        name, _, backing = line.strip().partition(" ")
        if backing.strip().removesuffix(" (deleted)") == want:
            found.append(name)
    return found


def _kernel_has_device_mapper() -> bool:
    misc = Path("/proc/misc")
    return misc.exists() and "device-mapper" in misc.read_text().split()


def mappings(prefix: str = "spank-sif-") -> list[str]:
    """Device-mapper devices named ``prefix...``, as ``dmsetup ls`` reports them (the system, not
    the engine under test). Where the kernel has no device-mapper there can be none; where it has
    one, dmsetup must answer (a check that cannot ask is no check)."""
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        if not _kernel_has_device_mapper():
            return []
        raise AssertionError(f"dmsetup ls failed on a kernel with device-mapper: {out.stderr.strip()}")
    return sorted(line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix))


def mounted(target: Path) -> bool:
    """Whether this mount namespace has a mount at ``target``, as ``findmnt`` reports it."""
    return subprocess.run(["findmnt", "--mountpoint", str(target)], capture_output=True).returncode == 0


def leftovers(image: Path, state_dir: Path, target: Path | None = None, settle: float = 3.0) -> list[str]:
    """Everything an attempt on ``image`` may have left: loop devices, spank-sif mappings, a mount at
    ``target``, state records. Empty means clean. Loop devices get ``settle`` seconds to finish an
    auto-clear the kernel may complete just after their last holder went."""
    deadline = time.monotonic() + settle
    while loops_backed_by(image) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [f"loop {d}" for d in loops_backed_by(image)]
    left += [f"mapping {n}" for n in mappings()]
    if target is not None and mounted(target):
        left.append(f"mount {target}")
    if state_dir.exists():
        left += [f"record {p.relative_to(state_dir)}" for p in state_dir.rglob("*.json")]
        left += [f"job dir {p.name}" for p in state_dir.iterdir() if p.is_dir()]
    return left


def pem_padded(pem: bytes, size: int) -> bytes:
    """``pem`` after one comment line making ``size`` bytes in all: text before a PEM block is
    ignored by its readers, so the key still works (for the PEM file size cap's tests)."""
    return b"#" * (size - len(pem) - 1) + b"\n" + pem


@pytest.fixture
def site(tmp_path):
    """(site configuration, state directory) for engine tests: the state directory private to the
    test; afterwards the CLI's objects and every job the test recorded are swept, so that no test
    leaves a mapping, loop device or record to the next."""
    from spank_sif import lifecycle
    from spank_sif.config import SiteConfig
    state = tmp_path / "state"
    config = SiteConfig(state_dir=str(state))
    yield config, state
    jobs = {p.name for p in state.iterdir() if p.is_dir()} if state.exists() else set()
    for job in ["cli", *sorted(jobs - {"cli"})]:
        lifecycle.sweep_job(job, config)
