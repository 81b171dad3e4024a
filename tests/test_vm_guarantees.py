"""Guarantees of docs/security-model.md that need dm-crypt (the VM harness), each checked from
outside the engine (the kernel, /proc, the files) so that it fails if the protection it names is
removed (docs/testing.md records which removal each one caught). Cheap-KDF reference images."""
import base64
import errno
import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine_helpers import site  # noqa: F401 - a pytest fixture
from engine_helpers import USER, ensure_users, in_child, leftovers, mappings, pem_padded, world_dir
from spank_sif import keys, lifecycle, log
from spank_sif.userfiles import User

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def images(ref_images):
    """World-readable copies of the cheap-KDF images and the PEM private key (the job's user must be
    able to open them), and the passphrase and raw PEM-mode key as the test knows them."""
    ensure_users()
    d = world_dir("sif-vm-guarantees-")
    copies = {}
    for name, source in (("pass", ref_images.fast_pass_4k), ("pem", ref_images.fast_pem_4k),
                         ("key.pem", ref_images.pem_private)):
        copies[name] = d / source.name
        shutil.copyfile(source, copies[name])
        copies[name].chmod(0o644)
    copies["passphrase"] = ref_images.pass_file.read_text()
    copies["raw_key"] = ref_images.pem_key.read_bytes()
    yield copies
    shutil.rmtree(d, ignore_errors=True)


def _user() -> User:
    return User.from_name(USER)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ guarantee 1: read-only mapping

def test_the_mapping_is_read_only(images, site):
    """The kernel holds the dm-crypt device read-only (blockdev, dmsetup) and refuses a write to it,
    even root's; the image file is unchanged."""
    config, state = site
    image = images["pass"]
    before = _sha256(image)
    unlocked = lifecycle.unlock(str(image), _user(), {"APPTAINER_ENCRYPTION_PASSPHRASE": images["passphrase"]},
                                "cli", config)
    try:
        assert mappings() == [unlocked.session]
        getro = subprocess.run(["blockdev", "--getro", unlocked.device], capture_output=True, text=True, check=True)
        assert getro.stdout.strip() == "1"
        info = subprocess.run(["dmsetup", "info", unlocked.session], capture_output=True, text=True, check=True)
        assert "ACTIVE (READ-ONLY)" in info.stdout, info.stdout
        with pytest.raises(OSError) as refused:
            fd = os.open(unlocked.device, os.O_WRONLY | os.O_DIRECT)
            try:
                os.write(fd, bytes(4096))
                os.fsync(fd)
            finally:
                os.close(fd)
        assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), refused.value
    finally:
        lifecycle.release(unlocked, config)
    assert _sha256(image) == before
    assert leftovers(image, state) == []


def test_the_mapping_is_read_only_even_over_a_writable_device(images, tmp_path):
    """The activation's own read-only flag, without the layers under it: over a writable loop device
    (made here, not by the engine) on a writable copy, the mapping the engine activates is read-only
    and refuses root's write; the copy is unchanged."""
    from spank_sif import dmcrypt, libcryptsetup, sif
    from spank_sif.secret import Secret
    copy = tmp_path / "writable.sif"
    shutil.copyfile(images["pass"], copy)
    before = _sha256(copy)
    fd = os.open(copy, os.O_RDWR)
    part = sif.read_sif(fd).primary_partition()
    loop_dev = subprocess.run(["losetup", "-f", "--show", "-o", str(part.offset), "--sizelimit", str(part.size),
                               str(copy)], capture_output=True, text=True, check=True).stdout.strip()
    name = f"spank-sif-rwtest-{os.getpid()}"
    try:
        assert subprocess.run(["blockdev", "--getro", loop_dev], capture_output=True, text=True,
                              check=True).stdout.strip() == "0"  # the layer under it is writable
        with libcryptsetup.Header(fd, part.offset, part.size) as header, \
                Secret(bytearray(images["passphrase"].encode())) as secret:
            device = dmcrypt.activate(header, loop_dev, name, secret.value)
        assert subprocess.run(["blockdev", "--getro", device], capture_output=True, text=True,
                              check=True).stdout.strip() == "1"
        with pytest.raises(OSError) as refused:
            wfd = os.open(device, os.O_WRONLY | os.O_DIRECT)
            try:
                os.write(wfd, bytes(4096))
                os.fsync(wfd)
            finally:
                os.close(wfd)
        assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), refused.value
    finally:
        dmcrypt.deactivate(name)
        subprocess.run(["losetup", "-d", loop_dev], check=False)
        os.close(fd)
    assert _sha256(copy) == before


# ------------------------------------------------------------------ guarantee 9: lost records

def test_a_mapping_whose_records_were_lost_is_swept_by_the_job_epilog(images, site):
    """The records of a step are gone (a state directory wiped while the job ran): the job epilog's
    sweep still finds the job's mapping by its name and removes it, and the loop device under it
    goes with it, as the kernel and losetup tell."""
    config, state = site
    image = images["pass"]
    unlocked = lifecycle.unlock(str(image), _user(), {"APPTAINER_ENCRYPTION_PASSPHRASE": images["passphrase"]},
                                "4950.0", config)
    try:
        shutil.rmtree(state / "4950")
        assert mappings() == [unlocked.session]
        lifecycle.sweep_job("4950", config)  # what the job epilog runs (callbacks.job_epilog, spank-sif epilog)
        assert mappings() == []
        assert leftovers(image, state) == []
    finally:  # if the sweep failed, later tests on this kernel must not inherit the mapping
        if mappings(unlocked.session):
            subprocess.run(["dmsetup", "remove", "--retry", unlocked.session], capture_output=True, check=False)


# ------------------------------------------------------------------ guarantee 8: the unwrapped key

class ProcessWatch:
    """Every process's argv and environment, read from /proc again and again until stopped: which
    of ``secrets`` each one held, and how many full rounds over /proc were made."""

    def __init__(self, secrets: list[bytes]):
        self.secrets = secrets
        self.hits: list[tuple[bytes, str]] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _look(self, pid: str) -> None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return  # gone meanwhile
        for what, data in (("argv", cmdline), ("environment", environ)):
            self.hits += [(secret, f"pid {pid} {what}: {cmdline!r}") for secret in self.secrets if secret in data]

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    self._look(pid)
            self.rounds += 1
            time.sleep(0.002)


def test_the_unwrapped_pem_key_is_in_no_argv_log_or_record(images, site):
    """PEM mode: the 64-byte key unwrapped from the image, raw or in hex or base64, goes to
    libcryptsetup in memory only. It is in no process's argv or environment while the unlock runs
    (a watch over /proc, shown to work by a marker it must find in another process's argv), in none
    of the engine's log lines at the debug level, and in no state record while the image is open."""
    config, state = site
    key = images["raw_key"]
    forms = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]
    marker = f"spank-sif-watch-marker-{os.urandom(8).hex()}".encode()
    said: list[str] = []
    log.configure(lambda level, message: said.append(message), "debug")
    try:
        with ProcessWatch([*forms, marker]) as watch, \
                subprocess.Popen(["sh", "-c", "sleep 30; :", marker.decode()]) as beacon:  # stays a shell
            try:
                rounds = watch.rounds
                unlocked = lifecycle.unlock(str(images["pem"]), _user(),
                                            {"APPTAINER_ENCRYPTION_PEM_PATH": str(images["key.pem"])}, "4951.0",
                                            config)
                try:
                    records = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
                finally:
                    lifecycle.release(unlocked, config)
                    lifecycle.sweep_job("4951", config)  # a job's steps share its mapping until the epilog
                rounds = watch.rounds - rounds
            finally:
                beacon.kill()
    finally:
        log.configure(None)
    assert rounds >= 2, rounds  # the watch went over every process at least once during the unlock
    assert any(secret == marker for secret, _ in watch.hits), "the watch never saw the marker's process"
    assert [where for secret, where in watch.hits if secret != marker] == []
    assert any(p.name.endswith("~mapping.json") for p in records), records  # looked while it was open
    assert [p for p, data in records.items() if any(form in data for form in forms)] == []
    assert any("keyslot" in line for line in said), said  # the engine did log its steps
    assert [line for line in said if any(form.decode("latin-1") in line for form in forms)] == []
    assert leftovers(images["pem"], state) == []


# ------------------------------------------------------------------ guarantee 6: PEM file size cap

def test_a_pem_key_file_above_the_size_cap_is_refused(images, site, wd):
    """The engine's path (the file read as the user): a working key padded to one byte more than
    keys.MAX_PEM_FILE is refused as too large, in one line, before anything is mapped; padded to
    exactly the cap, the same key still loads (so the refusal is the cap's, not the padding's).
    verify-key's path: tests/test_guarantees.py."""
    config, state = site
    pem = images["key.pem"].read_bytes()
    at_cap, above = wd / "at-cap.pem", wd / "above-cap.pem"
    at_cap.write_bytes(pem_padded(pem, keys.MAX_PEM_FILE))
    above.write_bytes(pem_padded(pem, keys.MAX_PEM_FILE + 1))
    for path in (at_cap, above):
        path.chmod(0o644)
    assert (at_cap.stat().st_size, above.stat().st_size) == (keys.MAX_PEM_FILE, keys.MAX_PEM_FILE + 1)
    assert keys.load_private_key(at_cap.read_bytes(), "at-cap").key_size == 2048

    def attempt():
        lifecycle.release(lifecycle.unlock(str(images["pem"]), _user(), {"APPTAINER_ENCRYPTION_PEM_PATH": str(above)},
                                           "cli", config), config)
        return "opened"

    status, result = in_child(attempt)
    assert (status, "\n" in result) == (1, False), result
    # Refused for its size, whichever layer says it (userfiles.read_as_user reads at most the cap,
    # keys.read_pem checks it again): the file and the reason named.
    assert result.startswith("KeyMaterialError: ") and str(above) in result, result
    assert f"larger than {keys.MAX_PEM_FILE} bytes" in result or "too big for a key file" in result, result
    assert leftovers(images["pem"], state) == []


@pytest.fixture
def wd():
    path = world_dir("sif-vm-guarantees-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)
