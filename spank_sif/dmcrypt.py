"""dm-crypt activation of an image's LUKS2 volume, read-only.

libcryptsetup is called in-process through cffi (ABI mode: no compiler needed on the nodes), so
the key goes from a wiped buffer straight into the library and its errors are precise. Only when
the library is missing do we run the root-owned ``cryptsetup`` binary, with the key on stdin.

Before any key derivation runs, the keyslots to try are decided by ``luks2.affordable_keyslots``
(the site's KDF cap, cryptsetup's order), the same decision verify-key makes. Memory-hard KDFs
run under a node-wide semaphore (``kdf_max_parallel`` flock'ed slot files in the state directory)
so that many steps starting at
once cannot exhaust the node's memory.
"""
import errno
import fcntl
import os
import subprocess
import time
from contextlib import contextmanager
from spank_sif import log, luks2
from spank_sif.errors import SifError, SystemSetupError, UnsupportedImageError

LIBRARY = "libcryptsetup.so.12"
BINARIES = ("/usr/sbin/cryptsetup", "/sbin/cryptsetup")
MODPROBE = ("/usr/sbin/modprobe", "/sbin/modprobe")
DM_CONTROL = "/dev/mapper/control"

CRYPT_ACTIVATE_READONLY = 1 << 0
CRYPT_DEACTIVATE_DEFERRED = 1 << 0
CRYPT_LOG_ERROR = 1

DEACTIVATE_ATTEMPTS = 5  # EBUSY retries (a closing mount may still hold the device) before deferring
DEVICE_WAIT_S = 25.0     # how long /dev/mapper/<name> may take to appear (udev, slow nodes)
KDF_LOG_MAX = 64 * 1024  # kdf.log (recent KDF intervals, for admins and tests) is cut beyond this

_CDEF = """
struct crypt_device;
int crypt_init(struct crypt_device **cd, const char *device);
int crypt_load(struct crypt_device *cd, const char *requested_type, void *params);
int crypt_activate_by_passphrase(struct crypt_device *cd, const char *name, int keyslot,
                                 const char *passphrase, size_t passphrase_size, uint32_t flags);
int crypt_deactivate_by_name(struct crypt_device *cd, const char *name, uint32_t flags);
void crypt_free(struct crypt_device *cd);
void crypt_set_log_callback(struct crypt_device *cd,
                            void (*log)(int level, const char *msg, void *usrptr), void *usrptr);
"""


def open_library(path: str = LIBRARY):
    """``(ffi, lib)`` for the libcryptsetup at ``path`` (OSError or ImportError if it cannot be
    loaded). Functions resolve on first use: ``spank-sif doctor`` checks each one."""
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(path)


class _Library:
    """libcryptsetup loaded once per process, or None if the node lacks it."""

    _lib = None
    _loaded = False

    @classmethod
    def get(cls):
        if not cls._loaded:
            cls._loaded = True
            try:
                cls._lib = open_library()
            except (OSError, ImportError):
                cls._lib = None
        return cls._lib


def _using_library() -> bool:
    return os.environ.get("SPANK_SIF_CRYPTSETUP") != "binary" and _Library.get() is not None


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
    """At most ``slots`` memory-hard KDFs at once on this node, across processes (flock).

    Each holder appends ``pid start end`` (CLOCK_REALTIME) to ``kdf.log`` in the state directory,
    evidence for admins (and tests) of how KDFs overlapped.
    """

    def __init__(self, directory: str, slots: int):
        self.directory = directory
        self.slots = max(1, slots)

    def _open(self, index: int) -> int:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        return os.open(os.path.join(self.directory, f"kdf.{index}.lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def _acquire(self) -> int:
        fds = [self._open(i) for i in range(self.slots)]
        try:
            delay = 0.005
            while True:
                for fd in fds:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    fds.remove(fd)
                    return fd
                if self.slots == 1:  # a single slot can simply block
                    fcntl.flock(fds[0], fcntl.LOCK_EX)
                    return fds.pop()
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        finally:
            for fd in fds:
                os.close(fd)

    @contextmanager
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


@contextmanager
def _nothing():
    yield


# ---------------------------------------------------------------- activation


def activate(device: str, name: str, passphrase, volume, cap: int,
             semaphore: KdfSemaphore | None = None) -> str:
    """Map the LUKS2 volume on ``device`` read-only as ``name``; return ``/dev/mapper/<name>``.

    ``passphrase`` is a bytes-like object (a Secret's bytearray: the library reads it in place).
    Only the keyslots ``luks2.affordable_keyslots`` allows are tried, each named to libcryptsetup
    (so it cannot pick another), memory-hard ones under ``semaphore``; the error when none opens is
    ``luks2.no_keyslot_opened``'s.
    """
    try_slot = _library_slot if _using_library() else _binary_slot
    for slot in luks2.affordable_keyslots(volume, cap):
        guard = semaphore.held() if semaphore and slot.kdf.type.startswith("argon2") else _nothing()
        with guard:
            opened = try_slot(device, name, slot.id, passphrase)
        if opened:
            log.verbose(f"mapping {name} on {device}: keyslot {slot.id} ({slot.kdf.describe()})")
            return _wait_for_node(name)
        log.debug(f"keyslot {slot.id} of {device} did not accept the key")
    raise luks2.no_keyslot_opened(volume, cap)


def _library_slot(device: str, name: str, keyslot: int, passphrase) -> bool:
    ffi, lib = _Library.get()
    messages = []

    @ffi.callback("void(int, const char *, void *)")
    def log(level, msg, _usrptr):
        if level == CRYPT_LOG_ERROR and msg != ffi.NULL:
            messages.append(ffi.string(msg).decode(errors="replace").strip())

    cd = ffi.new("struct crypt_device **")
    rc = lib.crypt_init(cd, device.encode())
    if rc < 0:
        raise SystemSetupError(f"cannot open {device} for dm-crypt: {os.strerror(-rc)}")
    try:
        lib.crypt_set_log_callback(cd[0], log, ffi.NULL)
        rc = lib.crypt_load(cd[0], b"LUKS2", ffi.NULL)
        if rc < 0:
            raise UnsupportedImageError(f"the image's encrypted partition is not a LUKS2 volume this node "
                                        f"can load: {_last(messages, rc)}")
        buf = ffi.from_buffer("char[]", passphrase)  # no copy: the caller wipes the buffer
        rc = lib.crypt_activate_by_passphrase(cd[0], name.encode(), keyslot, buf, len(passphrase),
                                              CRYPT_ACTIVATE_READONLY)
    finally:
        lib.crypt_free(cd[0])
    if rc >= 0:
        return True
    if rc in (-errno.EPERM, -errno.ENOENT):
        return False  # wrong key for this keyslot (or an inactive one): try the next
    raise _activation_error(-rc, _last(messages, rc))


def _last(messages: list[str], rc: int) -> str:
    return messages[-1] if messages else os.strerror(-rc)


def _activation_error(err: int, detail: str) -> SifError:
    if err == errno.ENOMEM:
        return SystemSetupError(f"not enough memory on this node to derive the image's key ({detail}): "
                                "ask your admin (kdf_max_parallel) or use a node with more memory")
    if err in (errno.EINVAL, errno.ENOTSUP, errno.ENOENT):
        return UnsupportedImageError(f"this node cannot activate the image's LUKS2 volume: {detail}")
    if err == errno.EEXIST:
        return SystemSetupError(f"a device-mapper device of that name already exists: {detail}")
    return SystemSetupError(f"dm-crypt activation failed: {detail}")


def trusted_program(st: os.stat_result) -> bool:
    """Whether a program with this status may be handed a key: owned by root, writable by no one else."""
    return st.st_uid == 0 and not st.st_mode & 0o022


def _binary() -> str:
    for path in BINARIES:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if not trusted_program(st):
            raise SystemSetupError(f"{path} is not owned by root or is writable by others: refusing to "
                                   "hand it a key; ask your admin")
        return path
    raise SystemSetupError("neither libcryptsetup nor the cryptsetup program is installed on this node: "
                           "ask your admin to install cryptsetup")


# cryptsetup's documented exit codes
_EXIT_WRONG_KEY, _EXIT_NO_MEMORY = 2, 3


def _binary_slot(device: str, name: str, keyslot: int, passphrase) -> bool:
    proc = subprocess.Popen([_binary(), "open", "--type", "luks2", "--readonly", "--batch-mode",
                             "--key-slot", str(keyslot), "--key-file", "-", device, name],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    # communicate() writes from the caller's buffer itself (a memoryview): no copy of the key.
    _, stderr = proc.communicate(passphrase)
    if proc.returncode == 0:
        return True
    lines = stderr.decode(errors="replace").strip().splitlines()
    detail = lines[-1] if lines else f"cryptsetup exited with {proc.returncode}"
    if proc.returncode == _EXIT_WRONG_KEY:
        return False
    if proc.returncode == _EXIT_NO_MEMORY:
        raise _activation_error(errno.ENOMEM, detail)
    raise SystemSetupError(f"dm-crypt activation failed: {detail}")


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
    if _using_library():
        ffi, lib = _Library.get()
        rc = lib.crypt_deactivate_by_name(ffi.NULL, name.encode(), CRYPT_DEACTIVATE_DEFERRED if deferred else 0)
        return -rc if rc < 0 else 0
    argv = [_binary(), "close", *(["--deferred"] if deferred else []), name]
    proc = subprocess.run(argv, capture_output=True, check=False, stdin=subprocess.DEVNULL,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    if proc.returncode == 0:
        return 0
    return errno.EBUSY if proc.returncode == 5 else errno.EIO
