"""Read-only loop devices by ioctl, over an already-open file descriptor.

The loop device is bound to the fd the user opened (never to a path), limited to one partition
(offset and size), read-only, and set to auto-clear: the kernel detaches it as soon as the last
holder (our fd, then dm-crypt or the mount) lets go, so a crash cannot leak it for long.
"""
import errno
import fcntl
import os
import stat
import struct
import time
from typing import NamedTuple

from spank_sif.errors import SystemSetupError

LOOP_CONTROL = "/dev/loop-control"

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64

# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64); number, encrypt_type,
# encrypt_key_size, flags (u32); file_name[64], crypt_name[64], encrypt_key[32]; init[2] (u64).
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size (u32); info (loop_info64); reserved[8] (u64).
_CONFIG = struct.Struct(f"=2I{_INFO64.size}s64x")

ATTACH_ATTEMPTS = 20  # free devices raced away by other attachers (EBUSY) before giving up
STATUS_ATTEMPTS = 10  # EAGAIN from LOOP_SET_STATUS64 while the kernel flushes the page cache


class LoopStatus(NamedTuple):
    backing_dev: int
    backing_ino: int
    offset: int
    sizelimit: int
    flags: int


class LoopDevice:
    """An attached loop device; ``fd`` keeps it alive until ``close()`` (then autoclear applies)."""

    __slots__ = ("path", "number", "fd")

    def __init__(self, path: str, number: int, fd: int):
        self.path, self.number, self.fd = path, number, fd

    def __repr__(self):
        return f"LoopDevice({self.path!r}, fd={self.fd})"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _info(offset: int, size: int, backing_name: str) -> bytes:
    name = os.fsencode(backing_name)[: LO_NAME_SIZE - 1]
    return _INFO64.pack(0, 0, 0, offset, size, 0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                        name, b"", b"", 0, 0)


def _device_node(number: int) -> str:
    """``/dev/loopN``, created from sysfs' major:minor if udev has not (containers, minimal /dev)."""
    path = f"/dev/loop{number}"
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            return path
        raise SystemSetupError(f"{path} exists but is not a block device: ask your admin to fix /dev")
    except FileNotFoundError:
        pass
    try:
        with open(f"/sys/block/loop{number}/dev", encoding="ascii") as f:
            major, minor = (int(x) for x in f.read().split(":"))
        os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(major, minor))
    except FileExistsError:
        pass
    except (OSError, ValueError) as exc:
        raise SystemSetupError(f"cannot create {path}: {exc}: ask your admin to check /dev") from exc
    return path


def _free_number() -> int:
    try:
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise SystemSetupError(f"no free loop device: {LOOP_CONTROL} is missing (this node's kernel "
                               "lacks the loop driver: ask your admin to load it)") from exc
    except OSError as exc:
        raise SystemSetupError(f"no free loop device: cannot open {LOOP_CONTROL}: {exc.strerror} "
                               "(does this node's kernel have the loop driver?)") from exc
    try:
        return fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise SystemSetupError(f"no free loop device: the kernel refused one ({exc.strerror}): "
                               "ask your admin to raise the number of loop devices") from exc
    finally:
        os.close(ctl)


def _configure(loop_fd: int, backing_fd: int, info: bytes) -> None:
    """LOOP_CONFIGURE (Linux >= 5.8), else the older two-step LOOP_SET_FD + LOOP_SET_STATUS64."""
    try:
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, _CONFIG.pack(backing_fd, 0, info))
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(loop_fd, LOOP_SET_FD, backing_fd)
    for attempt in range(STATUS_ATTEMPTS):
        try:
            fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, info)
            return
        except OSError as exc:
            if exc.errno != errno.EAGAIN or attempt == STATUS_ATTEMPTS - 1:
                fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)
                raise
            time.sleep(0.05 * (attempt + 1))


def attach(fd: int, offset: int, size: int, name: str = "") -> LoopDevice:
    """A read-only, auto-clearing loop device over ``size`` bytes of ``fd`` from ``offset``."""
    if size <= 0:  # the kernel reads size 0 as "to the end of the file": never ask for that
        raise ValueError(f"loop device over {size} bytes")
    info = _info(offset, size, name)
    last = None
    for attempt in range(ATTACH_ATTEMPTS):
        number = _free_number()
        path = _device_node(number)
        loop_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _configure(loop_fd, fd, info)
        except OSError as exc:
            os.close(loop_fd)
            if exc.errno not in (errno.EBUSY, errno.EAGAIN):
                raise SystemSetupError(f"cannot set up loop device {path}: {exc.strerror}") from exc
            last = exc  # another process took this device first: ask for another one
            time.sleep(0.01 * attempt)
            continue
        return LoopDevice(path, number, loop_fd)
    raise SystemSetupError(f"no free loop device: every one offered was taken by others "
                           f"({ATTACH_ATTEMPTS} attempts, last: {last.strerror if last else '?'}): try again later")


def status(path: str) -> LoopStatus | None:
    """What a loop device is bound to, or None if it is free (or gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        buf = bytearray(_INFO64.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
    except OSError:  # ENXIO: not bound
        return None
    finally:
        os.close(fd)
    fields = _INFO64.unpack(bytes(buf))
    return LoopStatus(fields[0], fields[1], fields[3], fields[4], fields[8])


def is_ours(path: str, backing_dev: int, backing_ino: int, offset: int) -> bool:
    """Whether ``path`` is bound to that file at that offset, read-only and auto-clearing."""
    st = status(path)
    want = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
    return st is not None and (st.backing_dev, st.backing_ino, st.offset) == (backing_dev, backing_ino, offset) \
        and st.flags & want == want


def wait_released(path: str, backing_dev: int, backing_ino: int, offset: int, timeout: float = 2.0) -> bool:
    """Wait (bounded) until ``path`` is no longer ours: the kernel may finish an auto-clear shortly
    after the last holder lets go. True if it is free of us."""
    deadline = time.monotonic() + timeout
    while is_ours(path, backing_dev, backing_ino, offset):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def detach_if_ours(path: str, backing_dev: int, backing_ino: int, offset: int) -> bool:
    """Detach ``path`` if it is still bound to that file at that offset as one of ours.

    LOOP_CLR_FD on a device something still holds only (re)sets autoclear, so this never pulls a
    device from under a live mapping or mount. Returns True if the device was ours.
    """
    if not is_ours(path, backing_dev, backing_ino, offset):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError:
        pass  # ENXIO: it went away meanwhile
    finally:
        os.close(fd)
    return True
