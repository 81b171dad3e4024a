"""dm-crypt activation of an image's LUKS2 volume, read-only, and the node's KDF lock.

libcryptsetup does the work in-process (``libcryptsetup.Header``: a header snapshot of the image
that it loaded itself, checked against the site's caps before anything runs). This module adds the
kernel side and the node-wide lock: memory-hard key derivations run under a semaphore
(``kdf_max_parallel`` flock'ed slot files in the state directory, waited for at most
``kdf_lock_timeout`` seconds) so that many steps starting at once cannot exhaust the node's
memory. Only the derivation runs under it: the snapshot is read before, and the device-mapper
device is created (and its node waited for) after the lock is released.
"""
import contextlib
import errno
import fcntl
import os
import subprocess
import time

from spank_sif import libcryptsetup, log
from spank_sif.errors import SystemSetupError

MODPROBE = ("/usr/sbin/modprobe", "/sbin/modprobe")
DM_CONTROL = "/dev/mapper/control"

CRYPT_DEACTIVATE_DEFERRED = 1 << 0

DEACTIVATE_ATTEMPTS = 5  # EBUSY retries (a closing mount may still hold the device) before deferring
DEVICE_WAIT_S = 25.0     # how long /dev/mapper/<name> may take to appear (udev, slow nodes)
KDF_LOG_MAX = 64 * 1024  # kdf.log (recent KDF intervals, for admins and tests) is cut beyond this


# ---------------------------------------------------------------- the kernel side


def _modprobe(*modules: str) -> None:
    for path in MODPROBE:
        if os.path.exists(path):
            subprocess.run([path, "-q", *modules], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False, env={"PATH": "/usr/sbin:/sbin"})
            return


def _control_works() -> bool:
    try:
        os.close(os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


def check_kernel() -> None:
    """Make sure device-mapper and dm-crypt are there (loading them if possible), or say why not."""
    if not _control_works():
        _modprobe("dm_mod")
        if not _control_works():
            raise SystemSetupError("this node's kernel lacks device-mapper/dm-crypt (no usable "
                                   f"{DM_CONTROL}): ask your admin to load the dm_crypt module, or use "
                                   "another node")
    if not os.path.isdir("/sys/module/dm_crypt"):
        _modprobe("dm_crypt")  # built-in dm_crypt shows there too; if loading fails, activation says so


def device_path(name: str) -> str:
    return f"/dev/mapper/{name}"


def active_names(prefix: str = "") -> list[str]:
    """Names of the device-mapper devices the kernel has, per sysfs."""
    names: list[str] = []
    try:
        entries = os.listdir("/sys/block")
    except OSError:
        return names
    for entry in entries:
        if entry.startswith("dm-"):
            try:
                with open(f"/sys/block/{entry}/dm/name", encoding="utf-8") as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name.startswith(prefix):
                names.append(name)
    return sorted(names)


def is_active(name: str) -> bool:
    return name in active_names(name)


def _wait_for_node(name: str) -> str:
    path = device_path(name)
    delay, waited = 0.005, 0.0
    while not os.path.exists(path):
        if waited >= DEVICE_WAIT_S:
            raise SystemSetupError(f"{path} did not appear within {DEVICE_WAIT_S:.0f} s after activation: "
                                   "ask your admin to check udev on this node")
        time.sleep(delay)
        waited += delay
        delay = min(delay * 2, 0.5)
    return path


# ---------------------------------------------------------------- KDF cost and concurrency


class KdfSemaphore:
    """At most ``slots`` memory-hard KDFs at once on this node, across processes (flock), waited
    for at most ``timeout`` seconds.

    Each holder appends ``pid start end`` (CLOCK_REALTIME) to ``kdf.log`` in the state directory,
    evidence for admins (and tests) of how KDFs overlapped.
    """

    def __init__(self, directory: str, slots: int, timeout: float):
        self.directory = directory
        self.slots = max(1, slots)
        self.timeout = timeout

    def _open(self, index: int) -> int:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        return os.open(os.path.join(self.directory, f"kdf.{index}.lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def _acquire(self) -> int:
        fds = [self._open(i) for i in range(self.slots)]
        try:
            # Polled, not blocking: a blocking flock cannot be given a deadline without a signal,
            # and slurmstepd's threads are no place for signal handlers.
            deadline, delay = time.monotonic() + self.timeout, 0.005
            while True:
                for fd in fds:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    fds.remove(fd)
                    return fd
                if time.monotonic() >= deadline:
                    raise SystemSetupError(
                        f"gave up after {self.timeout:g} s waiting for this node's key-derivation slot "
                        f"(kdf_max_parallel: {self.slots}), which other steps' unlocks held all that time: "
                        "try again later, or ask your admin (kdf_lock_timeout, kdf_max_parallel)")
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        finally:
            for fd in fds:
                os.close(fd)

    @contextlib.contextmanager
    def held(self):
        fd = self._acquire()
        start = time.time()
        try:
            yield
        finally:
            self._log(start, time.time())
            os.close(fd)  # releases the flock

    def _log(self, start: float, end: float) -> None:
        path = os.path.join(self.directory, "kdf.log")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                if os.fstat(fd).st_size > KDF_LOG_MAX:
                    os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {start:.6f} {end:.6f}\n".encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # evidence only: never fail an unlock for it


# ---------------------------------------------------------------- activation


def activate(header: libcryptsetup.Header, device: str, name: str, passphrase,
             semaphore: KdfSemaphore | None = None) -> str:
    """Map the LUKS2 volume ``header`` describes, its data on ``device``, read-only as ``name``;
    return ``/dev/mapper/<name>``.

    ``passphrase`` is a bytes-like object (a Secret's bytearray: the library reads it in place).
    The keyslots tried are the ones ``header`` allows (the site's caps, libcryptsetup's order);
    memory-hard ones derive their key under ``semaphore``, and only that runs under it.
    """
    def guard(keyslot):
        return semaphore.held() if semaphore and keyslot.kdf.memory_hard else contextlib.nullcontext()

    keyslot, volume_key = header.unlock(passphrase, guard)
    with volume_key:
        header.activate(device, name, volume_key.value)
    log.verbose(f"mapping {name} on {device}: keyslot {keyslot} of the {header.volume.header_copy} header "
                f"({next(k.kdf.describe() for k in header.allowed if k.id == keyslot)})")
    return _wait_for_node(name)


# ---------------------------------------------------------------- removal


def deactivate(name: str) -> bool:
    """Remove mapping ``name``: retry while busy, then ask for deferred removal (the kernel removes
    it when its last user goes). False if it was not there."""
    if not is_active(name):
        return False
    for attempt in range(DEACTIVATE_ATTEMPTS):
        err = _remove(name, deferred=False)
        if err == 0 or not is_active(name):
            return True
        if err != errno.EBUSY:
            raise SystemSetupError(f"cannot remove mapping {name}: {os.strerror(err)}")
        time.sleep(0.02 * 2 ** attempt)
    err = _remove(name, deferred=True)
    if err not in (0, errno.ENODEV, errno.ENXIO) and is_active(name):
        raise SystemSetupError(f"cannot remove mapping {name}, even deferred: {os.strerror(err)}")
    return True


def _remove(name: str, deferred: bool) -> int:
    return libcryptsetup.deactivate(name, CRYPT_DEACTIVATE_DEFERRED if deferred else 0)
