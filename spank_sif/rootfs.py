"""The container's root file system: built as root in a task's own mount namespace, then entered.

The work area is a tmpfs at the site's mount point, in the task's own mount namespace, holding
``root`` (where the image's squashfs is mounted read-only) and ``files`` (a second tmpfs for what
the container needs that the image lacks: scaffolds, the generated /etc/passwd and /etc/group).
Host paths are bound onto targets inside the root; ``files`` is made read-only; ``pivot_root``
makes the image the task's ``/`` and the host's tree is detached. Everything is a mount in the
task's namespace: when the task ends, the kernel removes it all. The work area is *unbindable*:
a host directory bound recursively into the container (``/tmp``, when the mount point is under it)
leaves it out instead of showing the container its own scaffolding.

Two rules keep root safe while it builds a tree whose contents the user controls (the image):

- Targets are resolved inside the image root by the kernel (``openat2`` with ``RESOLVE_IN_ROOT``):
  ``..`` and absolute symbolic links cannot leave it, so an image's ``/data -> /../../etc`` leads to
  the image's ``/etc``, never the host's; ``/proc/<pid>/...`` magic links are refused. A target
  that is itself a symbolic link is refused (which path was meant is not clear).
- The image is never written. A target missing from the read-only image is made in a *scaffold*:
  a directory of the ``files`` tmpfs that holds the image directory's entries (each bound in, symbolic
  links copied) and then covers that directory, Apptainer's "underlay". Only the deepest directory
  that exists is covered, so the rest of the image stays the image. Nothing is ever created on the
  host: a target missing under a directory bound from the host is an error.
"""
import ctypes
import errno
import os
import stat

from spank_sif import mounts
from spank_sif.errors import SystemSetupError, UsageError

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_RELATIME, MS_UNBINDABLE = 1 << 21, 1 << 17
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38

# A remount of a bind replaces its per-mount flags: keep those the host's mount has (a noexec /tmp
# must stay noexec inside).
KEPT_FLAGS = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV,
              os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME,
              os.ST_RELATIME: MS_RELATIME}

# openat2(2): Linux 5.6 and later; the number is the same on every architecture.
SYS_OPENAT2 = 437
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_IN_ROOT = 0x01, 0x02, 0x04, 0x10
AT_FDCWD = -100
INSIDE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
# pivot_root(2) has no C library wrapper.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "riscv64": 41, "s390x": 217}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _oserror(what: str = "") -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), what)


def fd_path(fd: int) -> str:
    """A path naming exactly the file behind ``fd`` (mount(2) follows it to the descriptor)."""
    return f"/proc/self/fd/{fd}"


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise _oserror(target)


def open_in_root(root_fd: int, path: str, flags: int, resolve: int = INSIDE) -> int:
    """``path`` opened as if ``root_fd`` were ``/`` (close-on-exec)."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(root_fd), os.fsencode(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = _oserror(path)
        if err.errno == errno.ENOSYS:
            raise SystemSetupError("this node's kernel is too old for --sif-container (it needs "
                                   "Linux 5.6 or later: openat2)") from err
        raise err
    return fd


def set_no_new_privs() -> None:
    """From here on, no exec can grant privileges (setuid bits, file capabilities)."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SystemSetupError(f"cannot set no_new_privs: {_oserror().strerror}")


def kept_flags(fd: int) -> int:
    """The mount flags of the mount holding ``fd`` that a remount must keep."""
    have = os.fstatvfs(fd).f_flag
    return sum(ms for st, ms in KEPT_FLAGS.items() if have & st)


WORK_TMPFS = "mode=0755,size=64k,nr_inodes=16"
FILES_TMPFS = "mode=0755,size=4m"


class RootBuilder:
    """Builds the container's root in a work area at ``mount_point`` (see the module's text)."""

    def __init__(self, mount_point: str):
        self.mount_point = mount_point
        self.root = os.path.join(mount_point, "root")
        self.files = os.path.join(mount_point, "files")
        self.files_fd = -1
        self.files_dev: int | None = None  # the tmpfs of scaffolds and generated files
        self.image_dev: int | None = None  # set once the image is mounted at self.root
        self.scaffolds = 0

    def prepare(self) -> None:
        """Mount the work area (unbindable) and its ``files`` tmpfs; ``root`` is left to mount."""
        dir_fd = mounts.prepare_mount_point(self.mount_point, create=True)
        try:
            mount("tmpfs", fd_path(dir_fd), "tmpfs", MS_NOSUID | MS_NODEV, WORK_TMPFS)
            mount(None, self.mount_point, None, MS_UNBINDABLE)
            for name in ("root", "files"):
                os.mkdir(os.path.join(self.mount_point, name), 0o755)
            mount("tmpfs", self.files, "tmpfs", MS_NOSUID | MS_NODEV, FILES_TMPFS)
        except OSError as exc:
            raise SystemSetupError(f"cannot set up the container's work area at {self.mount_point}: "
                                   f"{exc.strerror}") from exc
        finally:
            os.close(dir_fd)
        self.files_fd = os.open(self.files, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.files_dev = os.fstat(self.files_fd).st_dev

    def close(self) -> None:
        if self.files_fd >= 0:
            os.close(self.files_fd)
            self.files_fd = -1

    def image_mounted(self) -> None:
        self.image_dev = os.stat(self.root).st_dev

    # ---------------------------------------------------------- lookups inside the root

    def _root_fd(self) -> int:
        # By path every time: the topmost mount at the root (a scaffold may cover the image's /).
        return os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def lookup(self, path: str, flags: int = os.O_PATH | os.O_NOFOLLOW, resolve: int = INSIDE) -> int | None:
        """``path`` inside the root, or None if it does not exist."""
        root = self._root_fd()
        try:
            return open_in_root(root, path, flags, resolve)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                raise UsageError(f"bind target {path}: a component of the path is not a directory "
                                 "in the container") from exc
            if exc.errno == errno.ELOOP:
                raise UsageError(f"bind target {path}: too many levels of symbolic links, or a "
                                 "/proc link, in the container") from exc
            raise SystemSetupError(f"cannot look up {path} in the container: {exc.strerror}") from exc
        finally:
            os.close(root)

    def read_image_file(self, path: str, limit: int) -> bytes:
        """A small regular file of the image itself (not of a bind), or b"" if there is none."""
        try:
            root = self._root_fd()
            try:
                fd = open_in_root(root, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY,
                                  INSIDE | RESOLVE_NO_XDEV)
            finally:
                os.close(root)
        except OSError:
            return b""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                return b""
            return os.pread(fd, limit, 0)
        finally:
            os.close(fd)

    # ---------------------------------------------------------- targets

    def target(self, path: str, directory: bool, source: str) -> int:
        """An O_PATH descriptor of bind target ``path`` (made if missing), of the right kind."""
        fd = self.lookup(path)
        if fd is None:
            self._create(path, directory)
            fd = self.lookup(path)
            if fd is None:
                raise SystemSetupError(f"bind target {path} could not be made in the container")
        mode = os.fstat(fd).st_mode
        problem = None
        if stat.S_ISLNK(mode):
            problem = (f"bind target {path} is a symbolic link inside the image; bind to the path it "
                       "points to instead")
        elif stat.S_ISDIR(mode) != directory:
            kind = "a directory" if stat.S_ISDIR(mode) else "a file"
            problem = (f"bind target {path} is {kind} in the container, but {source} is not; "
                       "choose another destination")
        if problem:
            os.close(fd)
            raise UsageError(problem)
        return fd

    def _create(self, path: str, directory: bool) -> None:
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts) - 1, -1, -1):  # the deepest directory that exists
            parent = self.lookup("/" + "/".join(parts[:depth]), os.O_PATH | os.O_DIRECTORY)
            if parent is not None:
                break
        else:  # pragma: no cover - the root always exists
            raise SystemSetupError("the container's root is gone")
        try:
            dev = os.fstat(parent).st_dev
            if dev == self.image_dev:
                scaffold = self.scaffold(parent)
                os.close(parent)
                parent = scaffold
            elif dev != self.files_dev:
                where = "/" + "/".join(parts[:depth])
                raise UsageError(f"bind target {path} does not exist and cannot be made: {where} is "
                                 "a directory bound from the host; bind somewhere else")
            self._make(parent, parts[depth:], directory, path)
        finally:
            os.close(parent)

    def _make(self, parent: int, names: list[str], directory: bool, path: str) -> None:
        """Make ``names`` (a chain) under ``parent``, a directory of the ``files`` tmpfs."""
        fd = os.dup(parent)
        try:
            for i, name in enumerate(names):
                last = i == len(names) - 1
                try:
                    if directory or not last:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    else:
                        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644,
                                         dir_fd=fd))
                except FileExistsError as exc:  # a dangling symbolic link of the image
                    raise UsageError(f"bind target {path}: {name} is a symbolic link to a path the "
                                     "image does not have; bind to an existing path") from exc
                if not last:
                    nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.close(fd)
                    fd = nxt
        finally:
            os.close(fd)

    def scaffold(self, directory: int) -> int:
        """Cover image directory ``directory`` with a writable copy of its entries (each bound in,
        with whatever is mounted on it; symbolic links copied); returns the copy's descriptor."""
        self.scaffolds += 1
        name = f"scaffold{self.scaffolds}"
        st = os.fstat(directory)
        os.mkdir(name, 0o755, dir_fd=self.files_fd)
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=self.files_fd)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=self.files_fd)
        copy = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.files_fd)
        try:
            listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory)
            try:
                entries = os.listdir(listing)
            finally:
                os.close(listing)
            for entry in entries:
                self._copy_entry(directory, copy, entry)
            mount(fd_path(copy), fd_path(directory), None, MS_BIND | MS_REC)
        except BaseException:
            os.close(copy)
            raise
        return copy

    def _copy_entry(self, directory: int, copy: int, entry: str) -> None:
        mode = os.stat(entry, dir_fd=directory, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry, dir_fd=directory), entry, dir_fd=copy)
            return
        if stat.S_ISDIR(mode):
            os.mkdir(entry, 0o755, dir_fd=copy)
        else:
            os.close(os.open(entry, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=copy))
        source = os.open(entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        target = os.open(entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=copy)
        try:
            mount(fd_path(source), fd_path(target), None, MS_BIND | MS_REC)
        finally:
            os.close(source)
            os.close(target)

    # ---------------------------------------------------------- binds and entering

    def bind(self, source_fd: int, source: str, target: str, readonly: bool = False,
             restrict: bool = False) -> None:
        """Bind the host file or directory ``source_fd`` (named ``source`` in messages) at
        ``target`` inside the root; ``restrict`` adds nosuid and nodev."""
        directory = stat.S_ISDIR(os.fstat(source_fd).st_mode)
        fd = self.target(target, directory, source)
        try:
            mount(fd_path(source_fd), fd_path(fd), None, MS_BIND | MS_REC)
        except OSError as exc:
            raise SystemSetupError(f"cannot bind {source} at {target} in the container: {exc.strerror}") from exc
        finally:
            os.close(fd)
        extra = (MS_RDONLY if readonly else 0) | (MS_NOSUID | MS_NODEV if restrict else 0)
        if extra:
            top = self.lookup(target)
            if top is None:  # pragma: no cover - it was just mounted
                raise SystemSetupError(f"bind target {target} vanished")
            try:
                mount(None, fd_path(top), None, MS_REMOUNT | MS_BIND | extra | kept_flags(top))
            except OSError as exc:
                raise SystemSetupError(f"cannot make {target} {'read-only' if readonly else 'nosuid'} "
                                       f"in the container: {exc.strerror}") from exc
            finally:
                os.close(top)

    def add_file(self, name: str, data: bytes) -> int:
        """A root-owned file in ``files`` (read-only once entered); its O_PATH descriptor."""
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=self.files_fd)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, data)
        finally:
            os.close(fd)
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.files_fd)

    def enter(self) -> None:
        """Make ``files`` read-only, make the root the task's ``/``, detach the host's tree."""
        try:
            mount(None, self.files, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.chdir(self.root)
            pivot_root(".", ".")
            # The old root now sits on top of the new one: detaching it leaves the container alone.
            if _libc.umount2(b".", MNT_DETACH) != 0:
                raise _oserror("old root")
            os.chdir("/")
        except OSError as exc:
            raise SystemSetupError(f"cannot enter the container: {exc.strerror}") from exc


def pivot_root(new_root: str, put_old: str) -> None:
    machine = os.uname().machine
    number = SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise SystemSetupError(f"--sif-container does not know pivot_root on {machine}")
    if _libc.syscall(ctypes.c_long(number), os.fsencode(new_root), os.fsencode(put_old)) != 0:
        raise _oserror("pivot_root")
