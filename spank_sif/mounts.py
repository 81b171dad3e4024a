"""Private mount namespaces and read-only, nosuid, nodev squashfs mounts.

A job's image is mounted in a mount namespace of its own, whose root is a recursive *slave* of the
host's: the host's later mounts still appear inside, but nothing mounted inside ever shows outside.
"""
import ctypes
import errno
import os
import stat
import time

from spank_sif.errors import SystemSetupError, UsageError

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REC = 16384
MS_SLAVE = 1 << 19
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

UNMOUNT_ATTEMPTS = 10  # EBUSY retries before a lazy unmount

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, data))


def namespace_id(pid: int | str = "self") -> str:
    """The mount namespace's identity (``mnt:[inode]``), to tell whose mount a record is."""
    return os.readlink(f"/proc/{pid}/ns/mnt")


def enter_private_namespace() -> None:
    """Move the calling process (thread) into a new mount namespace, slave to the host's."""
    try:
        _check(_libc.unshare(CLONE_NEWNS))
        _mount(None, "/", None, MS_REC | MS_SLAVE)
    except OSError as exc:
        raise SystemSetupError(f"cannot create a private mount namespace: {exc.strerror}") from exc


_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def prepare_mount_point(path: str, create: bool, setting: str = "") -> int:
    """An O_PATH descriptor of the directory ``path``, walked without following symlinks.

    With ``create``, missing components are made root-owned, mode 0755 (the site mount point);
    ``setting`` says where the admin chose ``path``, for the message when that is impossible (a
    read-only root file system: diskless nodes). Every failure is a one-line SystemSetupError.
    Mounting through this descriptor means a symlink swapped in later cannot redirect the mount.
    """
    if not os.path.isabs(path):
        raise UsageError(f"mount point {path} must be an absolute path")
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in [p for p in os.path.normpath(path).split("/") if p]:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError as exc:
                if not create:
                    raise SystemSetupError(f"mount point {path} does not exist: create the directory "
                                           "first") from exc
                _create_dir(part, fd, path, setting)
                nxt = _open_dir(part, fd, path)
            except OSError as exc:
                raise SystemSetupError(f"mount point {path}: {_why_not_directory(part, fd, exc)}; "
                                       "refusing to mount there") from exc
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_dir(name: str, dir_fd: int, path: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise SystemSetupError(f"mount point {path}: {_why_not_directory(name, dir_fd, exc)}; "
                               "refusing to mount there") from exc


def _create_dir(name: str, dir_fd: int, path: str, setting: str) -> None:
    try:
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        _fix_mode(name, dir_fd)  # whatever the umask: the job's user must reach the image
    except FileExistsError:
        pass  # another task of the step made it meanwhile
    except OSError as exc:
        fix = (f"create it on every node, or set {setting} to a directory that exists" if setting
               else "create it first")
        raise SystemSetupError(f"mount point {path} does not exist and cannot be created "
                               f"({exc.strerror}): {fix}") from exc


def _fix_mode(name: str, dir_fd: int) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)


def _why_not_directory(name: str, dir_fd: int, exc: OSError) -> str:
    try:
        if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            return f"{name} is a symbolic link"
    except OSError:
        pass
    if exc.errno == errno.ENOTDIR:
        return f"{name} is not a directory"
    return f"{name}: {exc.strerror}"


def mount_squashfs(device: str, target: str, create: bool = False, setting: str = "") -> None:
    """Mount the squashfs on ``device`` read-only, nosuid, nodev at ``target`` (``create`` and
    ``setting``: see prepare_mount_point)."""
    dirfd = prepare_mount_point(target, create, setting)
    try:
        _mount(device, f"/proc/self/fd/{dirfd}", "squashfs", MS_RDONLY | MS_NOSUID | MS_NODEV)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise SystemSetupError("this node's kernel lacks squashfs: ask your admin to load the "
                                   "squashfs module") from exc
        if exc.errno == errno.EINVAL:
            raise SystemSetupError("the image's file system cannot be mounted (not squashfs, damaged, "
                                   "or a compression this kernel lacks)") from exc
        raise SystemSetupError(f"cannot mount the image at {target}: {exc.strerror}") from exc
    finally:
        os.close(dirfd)


def unmount(target: str) -> bool:
    """Unmount ``target``; retries while busy, then detaches lazily. False if nothing was mounted."""
    path = os.fsencode(target)
    for attempt in range(UNMOUNT_ATTEMPTS):
        if _libc.umount2(path, UMOUNT_NOFOLLOW) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False  # not a mount point (any more)
        if err != errno.EBUSY:
            raise SystemSetupError(f"cannot unmount {target}: {os.strerror(err)}")
        time.sleep(0.02 * (attempt + 1))
    if _libc.umount2(path, UMOUNT_NOFOLLOW | MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise SystemSetupError(f"cannot unmount {target}: {os.strerror(err)}")
    return True
