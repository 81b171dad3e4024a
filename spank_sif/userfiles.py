"""Open files with a user's permissions and hand the descriptor back to root.

Root never resolves a path a user chose: a forked child drops to the user's uid, gid and groups,
opens the path (following the user's symlinks, with the user's rights), and passes the open file
descriptor back over a socket pair. Everything afterwards works on that descriptor, so a symlink
swapped after the open changes nothing, and a file the user cannot read stays unreadable even
though the engine runs as root. The child keeps no descriptor of its parent but the socket: with
one, ``/proc/self/fd/N`` would reopen a file of root's (slurmstepd's) with the user's rights but
without walking the path that protects it.
"""
import array
import errno
import os
import pwd
import socket
import stat
from typing import NamedTuple

from spank_sif.errors import ImageError, SifError, SystemSetupError, UsageError
from spank_sif.secret import wipe

# How long the child may take to open a file (a hung NFS server must not hang a job forever).
OPEN_TIMEOUT_S = 60
MAX_FD = 2 ** 31 - 1  # os.closerange's end (close_range(2) closes the whole span at once)


class User(NamedTuple):
    """Who a file is opened as: numeric identity plus the name for messages."""

    uid: int
    gid: int
    groups: tuple
    name: str

    @classmethod
    def from_uid(cls, uid: int, gid: int | None = None) -> "User":
        return cls._from_entry(_passwd(pwd.getpwuid, uid, f"with uid {uid}"), gid)

    @classmethod
    def from_name(cls, name: str) -> "User":
        if name.isascii() and name.isdigit():  # "²" is a digit to isdigit(), not to int()
            return cls.from_uid(int(name))
        return cls._from_entry(_passwd(pwd.getpwnam, name, f"named {name!r}"), None)

    @classmethod
    def _from_entry(cls, entry, gid):
        gid = entry.pw_gid if gid is None else gid
        groups = os.getgrouplist(entry.pw_name, gid)
        return cls(entry.pw_uid, gid, tuple(sorted(set(groups))), entry.pw_name)


def _passwd(lookup, key, who: str):
    try:
        return lookup(key)
    except KeyError as exc:
        raise UsageError(f"no user {who} on this node") from exc


def _drop_to(user: User) -> None:
    """In the child: become the user for good, and prove it."""
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if user.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - would be a kernel or libc bug
            os._exit(99)
        if os.geteuid() != user.uid or os.getegid() != user.gid:  # pragma: no cover
            os._exit(99)


def _keep_only(sock: socket.socket) -> socket.socket:
    """In the child: close every descriptor inherited from the parent (stdio included) but the
    socket, which moves to fd 0 so one call closes everything above it."""
    fd = sock.detach()
    if fd != 0:
        os.dup2(fd, 0, inheritable=False)
    os.closerange(1, MAX_FD)
    return socket.socket(fileno=0)


def _acceptable(mode: int, directory_ok: bool) -> bool:
    return stat.S_ISREG(mode) or (directory_ok and stat.S_ISDIR(mode))


def _child(sock: socket.socket, path: str, user: User, flags: int, cwd: str | None,
           directory_ok: bool = False) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        sock = _keep_only(sock)
        try:
            _drop_to(user)
        except OSError as exc:
            sock.send(b"D%d" % (exc.errno or errno.EPERM))
            os._exit(0)
        if cwd:
            os.chdir(cwd)
        # O_NONBLOCK: opening a FIFO must fail the type check below, not hang.
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        if not _acceptable(os.fstat(fd).st_mode, directory_ok):
            sock.send(b"R")
        else:
            os.set_blocking(fd, True)
            socket.send_fds(sock, [b"K"], [fd])
    except OSError as exc:
        try:
            sock.send(b"E%d" % (exc.errno or errno.EIO))
        except OSError:
            code = 1
    except BaseException:  # noqa: BLE001 - the child must never fall back into the caller's code
        code = 2
    os._exit(code)


def open_as_user(path: str, user: User, flags: int = os.O_RDONLY, *, what: str = "image",
                 error: type[SifError] = ImageError, cwd: str | None = None,
                 directory_ok: bool = False) -> int:
    """Open ``path`` as ``user`` and return the descriptor (close-on-exec, a regular file, or with
    ``directory_ok`` also a directory: a bind source).

    ``what`` names the file in messages ("image", "key file"); ``error`` is the SifError class
    raised when the user cannot open it. ``cwd`` resolves relative paths (the user's directory).
    """
    if not path or "\0" in path:
        raise error(f"{what} path is empty or invalid")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - measured in the child, which never returns
            parent.close()
            _child(child, path, user, flags, cwd, directory_ok)
        child.close()
        parent.settimeout(OPEN_TIMEOUT_S)
        try:
            msg, fds = _receive(parent)
        except TimeoutError as exc:
            os.kill(pid, 9)
            raise error(f"opening {what} {path} as {user.name} took more than {OPEN_TIMEOUT_S} s: "
                        "is its file system hanging?") from exc
        finally:
            os.waitpid(pid, 0)
    finally:
        parent.close()
        child.close()
    return _result(msg, fds, path, user, what, error, directory_ok)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and at most one fd, close-on-exec from the start (socket.recv_fds ignores its
    flags argument in Python 3.11, so MSG_CMSG_CLOEXEC is passed here)."""
    fds = array.array("i")
    msg, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_LEN(fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _result(msg: bytes, fds: list, path: str, user: User, what: str, error,
            directory_ok: bool = False) -> int:
    kind = "a regular file or a directory" if directory_ok else "a regular file"
    if msg == b"K" and len(fds) == 1:
        fd = fds[0]
        if not _acceptable(os.fstat(fd).st_mode, directory_ok):  # trust, but verify
            os.close(fd)
            raise error(f"{what} {path} is not {kind}")
        return fd
    for fd in fds:
        os.close(fd)
    if msg == b"R":
        raise error(f"{what} {path} is not {kind}")
    if msg.startswith(b"D"):
        raise SystemSetupError(f"could not switch to user {user.name} to open {what} {path}: "
                       f"{os.strerror(int(msg[1:]))}")
    if msg.startswith(b"E"):
        raise error(_describe(int(msg[1:]), path, user.name, what))
    raise SystemSetupError(f"could not open {what} {path} as {user.name}: the helper process failed")


def _describe(err: int, path: str, user: str, what: str) -> str:
    if err == errno.ENOENT:
        return f"{what} {path} does not exist"
    if err in (errno.EACCES, errno.EPERM):
        return f"you ({user}) cannot read {what} {path}: check its permissions and its directories'"
    if err == errno.ENOTDIR:
        return f"{what} {path}: a component of the path is not a directory"
    if err == errno.EISDIR:
        return f"{what} {path} is a directory, not a file"
    if err == errno.ELOOP:
        return f"{what} {path}: too many levels of symbolic links"
    return f"cannot open {what} {path}: {os.strerror(err)}"


def open_as_self(path: str, *, what: str = "image", error: type[SifError] = ImageError) -> int:
    """``open_as_user`` for a process that already is the user (srun, sbatch and salloc on the
    submit host): opened here, with the same checks and the same messages, no child needed."""
    if not path or "\0" in path:
        raise error(f"{what} path is empty or invalid")
    try:
        # O_NONBLOCK: opening a FIFO must fail the type check below, not hang.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise error(_describe(exc.errno or errno.EIO, path, _user_name(os.getuid()), what)) from exc
    if not _acceptable(os.fstat(fd).st_mode, False):
        os.close(fd)
        raise error(f"{what} {path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_as_user(path: str, user: User, limit: int, *, what: str = "key file",
                 error: type[SifError] = ImageError, cwd: str | None = None) -> bytearray:
    """The contents of a small file the user can read (at most ``limit`` bytes), in a bytearray
    the caller can wipe: key files are read with it. Read straight into buffers of ours, each wiped
    once its contents moved on, so no copy of the file is left in memory behind the result."""
    fd = open_as_user(path, user, what=what, error=error, cwd=cwd)
    too_big = f"{what} {path} is larger than {limit} bytes: is it the right file?"
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(too_big)
        # One byte more than the file has: a file that grew meanwhile shows, and is read again.
        for room in (size + 1, limit + 1):
            buf = bytearray(room)
            try:
                got = _read_into(fd, buf)
                if got < room:
                    return bytearray(memoryview(buf)[:got])
            finally:
                wipe(buf)
        raise error(too_big)
    finally:
        os.close(fd)


def _read_into(fd: int, buf: bytearray) -> int:
    """Fill ``buf`` from the start of ``fd`` (until it is full or the file ends); bytes read."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], got)
        if not n:
            break
        got += n
    return got


def who_else_can_write(fd: int) -> str:
    """Who, besides root, can change the contents of the open file ``fd`` ("" if nobody can).

    Judged on the descriptor and its file system, never on a path: the owner (only root may be;
    an owner can always make a file writable again), the group and other write bits (with a POSIX
    ACL, the group bits are its mask, which bounds every named user and group entry), and the file
    system (FUSE: a user-space process serves the data and may change it at any time, whatever
    owner and mode it reports; a file system that cannot be identified counts as such)."""
    st = os.fstat(fd)
    if st.st_uid != 0:
        return f"its owner ({_user_name(st.st_uid)})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"its group or everyone (mode {stat.S_IMODE(st.st_mode):04o})"
    fs_type = filesystem_type(fd)
    if not fs_type:
        return "whoever serves its file system (which cannot be identified)"
    if fs_type in ("fuse", "fuseblk") or fs_type.startswith("fuse."):
        return f"the user-space process serving its file system ({fs_type})"
    return ""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def filesystem_type(fd: int) -> str:
    """The type of the file system ``fd`` lies on (``ext4``, ``nfs4``, ``fuse.sshfs``...), "" if
    unknown: the kernel's own record of the descriptor's mount (fdinfo's mnt_id, then mountinfo),
    so no file system server is asked anything."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            mount_id = next((line.split()[1] for line in f if line.startswith("mnt_id:")), None)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == mount_id and "-" in fields:
                    return fields[fields.index("-") + 1]
    except (OSError, IndexError, ValueError):
        pass
    return ""
