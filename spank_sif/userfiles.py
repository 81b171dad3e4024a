"""Open files with a user's permissions and hand the descriptor back to root.

Root never resolves a path a user chose: a forked child drops to the user's uid, gid and groups,
opens the path (following the user's symlinks, with the user's rights), and passes the open file
descriptor back over a socket pair. Everything afterwards works on that descriptor, so a symlink
swapped after the open changes nothing, and a file the user cannot read stays unreadable even
though the engine runs as root.
"""
import array
import errno
import os
import pwd
import socket
import stat
from typing import NamedTuple

from spank_sif.errors import ImageError, SifError, SystemSetupError, UsageError

# How long the child may take to open a file (a hung NFS server must not hang a job forever).
OPEN_TIMEOUT_S = 60


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


def _child(sock: socket.socket, path: str, user: User, flags: int, cwd: str | None) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        try:
            _drop_to(user)
        except OSError as exc:
            sock.send(b"D%d" % (exc.errno or errno.EPERM))
            os._exit(0)
        if cwd:
            os.chdir(cwd)
        # O_NONBLOCK: opening a FIFO must fail the type check below, not hang.
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
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
                 error: type[SifError] = ImageError, cwd: str | None = None) -> int:
    """Open ``path`` as ``user`` and return the descriptor (close-on-exec, a regular file).

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
            _child(child, path, user, flags, cwd)
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
    return _result(msg, fds, path, user, what, error)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and at most one fd, close-on-exec from the start (socket.recv_fds ignores its
    flags argument in Python 3.11, so MSG_CMSG_CLOEXEC is passed here)."""
    fds = array.array("i")
    msg, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_LEN(fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _result(msg: bytes, fds: list, path: str, user: User, what: str, error) -> int:
    if msg == b"K" and len(fds) == 1:
        fd = fds[0]
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # trust, but verify
            os.close(fd)
            raise error(f"{what} {path} is not a regular file")
        return fd
    for fd in fds:
        os.close(fd)
    if msg == b"R":
        raise error(f"{what} {path} is not a regular file")
    if msg.startswith(b"D"):
        raise SystemSetupError(f"could not switch to user {user.name} to open {what} {path}: "
                       f"{os.strerror(int(msg[1:]))}")
    if msg.startswith(b"E"):
        raise error(_describe(int(msg[1:]), path, user, what))
    raise SystemSetupError(f"could not open {what} {path} as {user.name}: the helper process failed")


def _describe(err: int, path: str, user: User, what: str) -> str:
    if err == errno.ENOENT:
        return f"{what} {path} does not exist"
    if err in (errno.EACCES, errno.EPERM):
        return f"you ({user.name}) cannot read {what} {path}: check its permissions and its directories'"
    if err == errno.ENOTDIR:
        return f"{what} {path}: a component of the path is not a directory"
    if err == errno.EISDIR:
        return f"{what} {path} is a directory, not a file"
    if err == errno.ELOOP:
        return f"{what} {path}: too many levels of symbolic links"
    return f"cannot open {what} {path}: {os.strerror(err)}"


def read_as_user(path: str, user: User, limit: int, *, what: str = "key file",
                 error: type[SifError] = ImageError, cwd: str | None = None) -> bytes:
    """The contents of a small file the user can read (at most ``limit`` bytes)."""
    fd = open_as_user(path, user, what=what, error=error, cwd=cwd)
    try:
        if os.fstat(fd).st_size > limit:
            raise error(f"{what} {path} is larger than {limit} bytes: is it the right file?")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{what} {path} is larger than {limit} bytes: is it the right file?")
        return b"".join(chunks)
    finally:
        os.close(fd)
