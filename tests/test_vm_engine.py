"""The node engine on a kernel with dm-crypt (the VM harness): encrypted reference images built the
way Apptainer builds them, opened with the real libcryptsetup and kernel, and torn down without a trace.

Most tests work in forked children of the test process (modules already imported: Python start-up
under emulation costs seconds) or in-process; the CLI itself is exercised where its behaviour is the
point."""
import contextlib
import dataclasses
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from engine_helpers import site  # noqa: F401 - a pytest fixture
from engine_helpers import (OTHER, USER, cli, ensure_users, in_child, in_children, leftovers, mappings,
                            mounted, world_dir, write_config)
from spank_sif import keys, lifecycle, sif
from spank_sif.userfiles import User

pytestmark = pytest.mark.vm

MODES = ("pass", "pem")
SECTORS = (512, 4096)


@pytest.fixture(scope="module")
def ref(ref_images):
    """World-readable copies of the reference images and keys, on the VM's tmpfs (the job's user
    must be able to open them; pytest's own temporary directories are root-only)."""
    ensure_users()
    d = world_dir("sif-vm-engine-")
    sources = [ref_images.pass_file, ref_images.pem_private, ref_images.file("blob.sha256")]
    sources += [ref_images.encrypted(m, s) for m in MODES for s in (*SECTORS, None)]
    for source in sources:
        shutil.copy(source, d / source.name)
        (d / source.name).chmod(0o644)
    fields = {f.name for f in dataclasses.fields(ref_images)}
    yield replace(ref_images, **{name: d for name in ("dir", "source") if name in fields})
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def wd():
    """A per-test directory the job's user can reach (pytest's tmp_path is under a root-only one)."""
    path = world_dir("sif-vm-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _user():
    return User.from_name(USER)


def _env(ref, mode: str) -> dict:
    if mode == "pass":
        return {"APPTAINER_ENCRYPTION_PASSPHRASE": ref.pass_file.read_text()}
    return {"APPTAINER_ENCRYPTION_PEM_PATH": str(ref.pem_private)}


def _open_read_close(ref, image, mode, config, target, check_blob=False) -> str:
    unlocked = lifecycle.unlock(str(image), _user(), _env(ref, mode), "cli", config)
    try:
        assert unlocked.device == f"/dev/mapper/{unlocked.session}"
        lifecycle.mount(unlocked, str(target), private=False)
        assert (target / "hello.txt").read_bytes() == ref.hello
        if check_blob:
            digest = hashlib.sha256((target / ref.blob_path).read_bytes()).hexdigest()
            assert digest == ref.blob_sha256
    finally:
        lifecycle.release(unlocked, config)
    return unlocked.session


def test_fifty_open_close_cycles_leave_nothing(ref, site, tmp_path):
    config, state = site
    target = tmp_path / "mnt"
    target.mkdir()
    images = [(ref.encrypted(m, s), m) for m in MODES for s in SECTORS]
    names = set()
    for cycle in range(12):
        for image, mode in images:
            names.add(_open_read_close(ref, image, mode, config, target, check_blob=cycle == 0))
    for mode in MODES:  # the realistic default-KDF images too: 48 + 2 = 50 cycles
        names.add(_open_read_close(ref, ref.encrypted(mode, None), mode, config, target, check_blob=True))
    assert len(names) == 50
    for image, _ in images:
        assert leftovers(image, state, target) == []
    assert leftovers(ref.enc_pass, state) == [] and leftovers(ref.enc_pem, state) == []


def test_cli_open_list_close_encrypted(ref, tmp_path):
    state = tmp_path / "state"
    config = write_config(tmp_path / "site.yaml", state_dir=str(state))
    target = tmp_path / "mnt"
    target.mkdir()
    proc = cli("open", ref.fast_pem_512, target, "--user", USER, "--pem-path", ref.pem_private, "--config", config)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip()
    assert os.path.exists(f"/dev/mapper/{name}") and (target / "hello.txt").read_bytes() == ref.hello
    assert name in cli("list", "--config", config, check=True).stdout
    assert cli("close", name, "--config", config).returncode == 0
    assert leftovers(ref.fast_pem_512, state, target) == []


def _busybox_as(user: str, binary: Path, *argv) -> subprocess.CompletedProcess:
    """Run a busybox copy as ``user`` under the name "busybox" (a copy called suid-busybox would
    otherwise look for an applet of that name)."""
    return _run_as(user, "bash", "-c", 'exec -a busybox "$0" "$@"', binary, *argv)


def _run_as(user: str, *argv) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *map(str, argv)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


EUID_PROBE = '#include <stdio.h>\n#include <unistd.h>\nint main(void){printf("%d\\n",(int)geteuid());return 0;}\n'


def _suid_probe_image(ref, wd: Path) -> Path:
    """An encrypted image (Apptainer's layout) whose tree holds ``bin/euid``: a setuid-root program
    that prints its effective uid (busybox drops set-uid privileges by itself for ``id``, so it cannot
    show whether the mount honours the bit), and ``dev/probe-null``: a device node (the null device)."""
    import reftools
    tree = wd / "probe-tree"
    shutil.copytree(ref.rootfs, tree, symlinks=True)
    (wd / "euid.c").write_text(EUID_PROBE)
    subprocess.run(["gcc", "-static", "-O", "-o", tree / "bin" / "euid", wd / "euid.c"], check=True)
    os.chmod(tree / "bin" / "euid", 0o4755)
    os.mknod(tree / "dev" / "probe-null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    sqfs = reftools.make_squashfs(tree, wd / "probe.sqfs")
    with contextlib.chdir(wd):  # cryptsetup reencrypt writes a temporary header in its cwd
        volume = reftools.luks_encrypt_payload(sqfs, wd / "probe.luks", ref.pass_file.read_bytes())
    image = reftools.sifref_build(wd / "probe.sif", volume, fs="encrypted")
    image.chmod(0o644)
    return image


def test_setuid_binaries_and_device_nodes_in_the_image_give_no_power(ref_images, ref, site, wd):
    """nosuid: a setuid-root program in the image runs with the user's uid; nodev: a device node in
    the image cannot be opened, not even by root. A control mount of the same device without those
    flags shows both would work otherwise."""
    config, _ = site
    target, control = wd / "mnt", wd / "control"
    target.mkdir(mode=0o755)
    control.mkdir(mode=0o755)
    image = _suid_probe_image(ref_images, wd)
    uid = str(pwd.getpwnam(USER).pw_uid)
    unlocked = lifecycle.unlock(str(image), _user(), _env(ref, "pass"), "cli", config)
    try:
        lifecycle.mount(unlocked, str(target), private=False)
        for binary in (target / "bin" / "suid-busybox", target / "bin" / "euid"):
            assert os.stat(binary).st_mode & 0o4000 and os.stat(binary).st_uid == 0
        ran = _busybox_as(USER, target / "bin" / "suid-busybox", "id", "-u")
        assert (ran.returncode, ran.stdout.strip()) == (0, uid), ran.stderr
        ran = _run_as(USER, target / "bin" / "euid")
        assert (ran.returncode, ran.stdout.strip()) == (0, uid), ran.stderr
        node = target / "dev" / "probe-null"
        assert stat.S_ISCHR(os.stat(node).st_mode) and os.stat(node).st_rdev == os.makedev(1, 3)
        with pytest.raises(PermissionError):
            open(node, "rb").close()  # noqa: SIM115 - the open itself is refused
        # Control: the same file system mounted without nosuid and nodev does run the probe as root
        # and does open the device, so the checks above really test the engine's flags.
        subprocess.run(["mount", "-t", "squashfs", "-o", "ro", unlocked.device, str(control)], check=True)
        try:
            assert _run_as(USER, control / "bin" / "euid").stdout.strip() == "0"
            with open(control / "dev" / "probe-null", "rb") as device:
                assert device.read(16) == b""
        finally:
            subprocess.run(["umount", str(control)], check=True)
    finally:
        lifecycle.release(unlocked, config)


def _hold_private_mount(unlocked, target: str, ready: int, go: int) -> None:
    lifecycle.mount(unlocked, target, private=True)
    with open(os.path.join(target, "hello.txt"), "rb") as f:
        f.read()
    os.write(ready, b"1")
    os.read(go, 1)


def test_other_users_see_neither_device_nor_private_mount(ref, site, wd):
    config, state = site
    target = wd / "mnt"
    target.mkdir(mode=0o755)
    unlocked = lifecycle.unlock(str(ref.fast_pem_4k), _user(), _env(ref, "pem"), "4711.0", config)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _hold_private_mount(unlocked, str(target), ready_w, go_r)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        inside = Path(f"/proc/{pid}/mountinfo").read_text()
        assert f" {target} " in inside  # mounted in the child's namespace...
        assert not mounted(target)  # ...invisible outside it
        assert not (target / "hello.txt").exists()
        seen = _run_as(OTHER, "ls", "-A", target)
        assert seen.returncode == 0 and seen.stdout == ""
        real = os.path.realpath(unlocked.device)
        for node in (unlocked.device, real, unlocked.loop.path if unlocked.loop else None):
            if node:
                denied = _run_as(OTHER, "head", "-c", "16", node)
                assert denied.returncode != 0 and "Permission denied" in denied.stderr, node
        assert lifecycle.list_active(config)[0]["mounts"] == [str(target)]
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
        lifecycle.release(unlocked, config)
        lifecycle.sweep_job("4711", config)  # a job's steps share its mapping until the epilog
    assert leftovers(ref.fast_pem_4k, state, target) == []


def _copies(image: Path, directory: Path, count: int) -> list[Path]:
    """``count`` distinct files (own inodes) with the content of ``image``, readable by the user."""
    out = []
    for i in range(count):
        copy = directory / f"{image.stem}-{i}.sif"
        shutil.copy(image, copy)
        copy.chmod(0o644)
        out.append(copy)
    return out


def _open_and_hold(ref, image, mode, config, target) -> str:
    unlocked = lifecycle.unlock(str(image), _user(), _env(ref, mode), "4800.0", config)
    lifecycle.mount(unlocked, str(target), private=False)
    return unlocked.session


def _parallel(ref, images: list[tuple[Path, str]], config, tmp_path, started=None) -> tuple[list, list[Path]]:
    """Open every (image, mode) at once, each in its own forked child that mounts it at its own
    target; return ((status, session) per image, targets). ``started(pids)``: see in_children."""
    targets = [tmp_path / f"mnt{i}" for i in range(len(images))]
    for t in targets:
        t.mkdir()
    results = in_children([(_open_and_hold, ref, image, mode, config, t) for (image, mode), t in zip(images, targets)],
                          started=started)
    return results, targets


def test_eight_parallel_opens_of_different_images(ref, site, tmp_path, wd):
    config, state = site
    images = [(c, "pass") for c in _copies(ref.fast_pass_512, wd, 4)] + \
             [(c, "pem") for c in _copies(ref.fast_pem_4k, wd, 4)]
    results, targets = _parallel(ref, images, config, tmp_path)
    try:
        assert [status for status, _ in results] == [0] * 8, results
        assert len({name for _, name in results}) == 8
        for t in targets:
            assert (t / "hello.txt").read_bytes() == ref.hello
    finally:
        lifecycle.sweep_job("4800", config)
    for (image, _), t in zip(images, targets):
        assert leftovers(image, state, t) == []


def _kdf_memory_kib(image: Path) -> int:
    """Keyslot 0's Argon2 memory, read from the LUKS2 header's JSON by the tests' own parser."""
    import luks_cases
    fd = os.open(image, os.O_RDONLY)
    try:
        part = sif.read_sif(fd).primary_partition()
        region = bytearray(os.pread(fd, 2 * 16384, part.offset))
    finally:
        os.close(fd)
    return int(luks_cases.metadata(region)["keyslots"]["0"]["kdf"]["memory"])


class MemoryWatch:
    """The anonymous resident memory (RssAnon) of some processes, sampled from outside through
    /proc until stopped: an Argon2 derivation shows as its memory cost, allocated and touched for
    as long as it runs, then freed. Anonymous memory only, because a forked child refaults its
    file pages (libraries) as it runs, while its anonymous pages start out as its parent's."""

    def __init__(self, interval: float = 0.003):
        import threading
        self.interval, self.sweeps, self.pids = interval, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, pids: list[int]) -> None:
        self.pids = list(pids)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _rss_anon_kib(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0  # gone, or a zombie (no memory left)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sweeps.append({pid: self._rss_anon_kib(pid) for pid in self.pids})
            time.sleep(self.interval)

    def deriving(self, memory_kib: int) -> list[set[int]]:
        """Per sweep, the processes then holding at least half of ``memory_kib`` above the least
        they were seen holding."""
        base = {pid: min((s[pid] for s in self.sweeps if s[pid]), default=0) for pid in self.pids}
        return [{pid for pid, rss in s.items() if rss and rss - base[pid] >= memory_kib // 2}
                for s in self.sweeps]


@pytest.mark.parametrize("allowed, image_name", [(2, "fast"), (1, "default")])
def test_parallel_opens_never_run_more_kdfs_than_allowed(ref, site, tmp_path, wd, allowed, image_name):
    """Eight steps unlock copies of one image at once under kdf_max_parallel: watched from outside
    (each process's memory, sampled while they run), never more derivations hold their memory at
    the same time than allowed, and each of the eight was seen deriving (the watch is fine enough
    to see them)."""
    config, state = site
    config = config._replace(kdf_max_parallel=allowed)
    image = ref.fast_pass_4k if image_name == "fast" else ref.enc_pass
    memory = _kdf_memory_kib(image)
    images = [(c, "pass") for c in _copies(image, wd, 8)]
    watch = MemoryWatch()
    try:
        results, targets = _parallel(ref, images, config, tmp_path, started=watch.start)
    finally:
        watch.stop()
    try:
        assert [status for status, _ in results] == [0] * 8, results
        deriving = watch.deriving(memory)
        seen = set().union(*deriving)
        most = max(len(d) for d in deriving)
        assert (len(seen), most <= allowed) == (8, True), (len(watch.sweeps), len(seen), most)
    finally:
        lifecycle.sweep_job("4800", config)
    for (image, _), t in zip(images, targets):
        assert leftovers(image, state, t) == []


@pytest.mark.parametrize("case, error, message", [
    ("wrong_passphrase", "WrongKeyError", "no keyslot of the image accepts this key"),
    ("no_key", "KeyMaterialError", "no key was given"),
    ("passphrase_for_pem_image", "WrongKeyError", "no keyslot"),
    ("pem_key_of_another_pair", "WrongKeyError", "the PEM key does not match this image"),
    ("pem_for_passphrase_image", "WrongKeyError", "encrypted with a passphrase"),
    ("kdf_above_cap", "PolicyError", "above this site's limit"),
    ("passes_above_cap", "PolicyError", "needs 4 passes, above this site's limit of 3 passes (kdf_max_time_cost)"),
    ("digest_above_cap", "PolicyError", "digest 0 needs"),
    ("missing_mount_point", "SystemSetupError", "does not exist"),
])
def test_faults_give_one_line_and_leave_nothing(ref, site, tmp_path, wd, case, error, message):
    config, state = site
    image, env, target = ref.fast_pass_4k, _env(ref, "pass"), tmp_path / "mnt"
    target.mkdir()
    if case == "wrong_passphrase":
        env = {"APPTAINER_ENCRYPTION_PASSPHRASE": "not the passphrase"}
    elif case == "no_key":
        env = {}
    elif case == "passphrase_for_pem_image":
        image = ref.fast_pem_512
    elif case == "pem_key_of_another_pair":
        private, _ = keys.generate_key_pair(2048)
        other = wd / "other.pem"
        other.write_bytes(private)
        other.chmod(0o644)
        image, env = ref.fast_pem_4k, {"APPTAINER_ENCRYPTION_PEM_PATH": str(other)}
    elif case == "pem_for_passphrase_image":
        env = _env(ref, "pem")
    elif case == "kdf_above_cap":
        config = config._replace(kdf_max_memory_kib=16384)
    elif case == "passes_above_cap":
        config = config._replace(kdf_max_time_cost=3)
    elif case == "digest_above_cap":
        config = config._replace(kdf_max_pbkdf2_iterations=999)
    elif case == "missing_mount_point":
        target = tmp_path / "nowhere"

    def attempt():
        unlocked = lifecycle.unlock(str(image), _user(), env, "cli", config)
        try:
            lifecycle.mount(unlocked, str(target), private=False)
        except BaseException:
            lifecycle.release(unlocked, config)
            raise
        lifecycle.release(unlocked, config)
        return "opened"

    status, result = in_child(attempt)
    assert status == 1, result
    assert "\n" not in result
    assert result.startswith(error + ":") and message in result, result
    assert leftovers(image, state, target) == []


KILL_POINTS = ("session", "loop", "key", "mapping", "unlocked", "mounted")


@pytest.mark.parametrize("step", KILL_POINTS)
def test_killed_between_steps_then_epilog_leaves_nothing(ref, site, tmp_path, step):
    config, state = site
    target = tmp_path / "mnt"
    target.mkdir()
    secret = ref.pass_file.read_bytes()

    def attempt():
        unlocked = lifecycle.unlock(str(ref.fast_pass_512), _user(), _env(ref, "pass"), "4900.0", config)
        lifecycle.mount(unlocked, str(target), private=False)
        return "finished"

    status, _ = in_child(attempt, env={"SPANK_SIF_KILL_AT": step})
    assert status == -9
    records = list(state.rglob("*.json"))
    assert records, "the crash left no record to sweep"
    for path in state.rglob("*"):  # records never hold the key
        if path.is_file():
            assert secret not in path.read_bytes()
            assert os.stat(path).st_mode & 0o077 == 0
    done = lifecycle.sweep_job("4900", config)
    assert done
    assert leftovers(ref.fast_pass_512, state, target) == []


def test_release_with_a_busy_mapping_defers_removal(ref, site, tmp_path):
    """Something still holds the device when the step ends: the mapping is removed as soon as it
    lets go (deferred removal), and the record is gone at once."""
    config, state = site
    unlocked = lifecycle.unlock(str(ref.fast_pass_4k), _user(), _env(ref, "pass"), "cli", config)
    holder = os.open(unlocked.device, os.O_RDONLY)
    try:
        lifecycle.release(unlocked, config)
        assert list(state.rglob("*.json")) == []
        assert mappings(unlocked.session) == [unlocked.session]  # still held
    finally:
        os.close(holder)
    deadline = time.monotonic() + 10
    while mappings(unlocked.session) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(ref.fast_pass_4k, state) == []


def _as_node(host: str, fn, *args):
    """In a forked child: become another node on this kernel (a UTS namespace of its own with the
    host name ``host``), then call ``fn``."""
    import ctypes
    import socket
    if ctypes.CDLL(None, use_errno=True).unshare(0x04000000) != 0:  # CLONE_NEWUTS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    socket.sethostname(host)
    return fn(*args)


def test_sweeps_without_records_leave_another_nodes_mapping_of_the_same_job(ref, site, tmp_path):
    """Two nodes share this kernel, each with a mapping of job 4700 and a state directory of its
    own. This node's records are lost: its sweeps find its own mapping by name (the node tag) and
    never touch the other node's, which its own epilog removes."""
    config, state = site
    other = config._replace(state_dir=str(tmp_path / "other-node-state"))

    def unlock(cfg) -> str:
        return lifecycle.unlock(str(ref.fast_pass_4k), _user(), _env(ref, "pass"), "4700.0", cfg).session

    status, theirs = in_child(_as_node, "other-node", unlock, other)
    assert status == 0, theirs
    try:
        for sweep in (lambda: lifecycle.sweep_stale(config, is_running=lambda jid: False),
                      lambda: lifecycle.sweep_job("4700", config)):
            ours = unlock(config)
            shutil.rmtree(state / "4700")                 # the records are lost
            assert sweep() == [f"mapping {ours}"]
            assert mappings("spank-sif-4700.") == [theirs]
    finally:
        status, done = in_child(_as_node, "other-node", lifecycle.sweep_job, "4700", other)
    assert status == 0 and f"mapping {theirs}" in done, done
    assert leftovers(ref.fast_pass_4k, state) == []
