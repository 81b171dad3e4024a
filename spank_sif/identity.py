"""Who the user is inside a container: /etc/passwd and /etc/group for the image.

A container runs with the user's own uid, gid and groups, but names come from the image's files,
which do not know the user: ``id -un``, ``whoami`` and ``~`` would fail. As Apptainer does, the
container gets generated copies of the image's two files with the user (and the user's groups)
added, bound over the image's. The host's entries are looked up once per step, as root on the host
(inside the container the host's user database is out of reach); the image's files are read per
task from the image itself. Pure functions of their inputs, so they are tested without a kernel.
"""
import contextlib
import grp
import pwd
from typing import NamedTuple

# An image's /etc/passwd or /etc/group larger than this is not read (a crafted image must not make
# root read without bound): the container then gets the user's entries alone.
MAX_FILE = 1 << 20


class Identity(NamedTuple):
    """The user's password entry and named groups, as the host knows them."""

    name: str
    uid: int
    gid: int
    gecos: str
    home: str
    shell: str
    groups: tuple  # ((gid, name), ...) for each group of the job that has a name on the host

    @classmethod
    def of(cls, uid: int, gid: int, gids) -> "Identity":
        """The host's entries for ``uid`` with primary group ``gid`` and groups ``gids``."""
        entry = pwd.getpwuid(uid)
        groups = []
        for g in dict.fromkeys([gid, *gids]):
            with contextlib.suppress(KeyError):  # a group without a name stays a number, as on the host
                groups.append((g, grp.getgrgid(g).gr_name))
        return cls(entry.pw_name, uid, gid, entry.pw_gecos, entry.pw_dir, entry.pw_shell, tuple(groups))


def _lines(text: bytes) -> list[bytes]:
    return [line for line in text.split(b"\n") if line.strip()]


def _field(line: bytes, index: int) -> bytes:
    fields = line.split(b":")
    return fields[index] if len(fields) > index else b""


def _text(value) -> bytes:
    # Entries are joined by ':' and end at '\n': keep those out of host values (a GECOS field may
    # hold anything the admin typed).
    return str(value).encode("utf-8", "surrogateescape").replace(b":", b" ").replace(b"\n", b" ")


def passwd(image_text: bytes, who: Identity) -> bytes:
    """The image's /etc/passwd without any entry for the user's name or uid, plus the user's."""
    name, uid = _text(who.name), _text(who.uid)
    kept = [line for line in _lines(image_text) if _field(line, 0) != name and _field(line, 2) != uid]
    entry = b":".join([name, b"x", uid, _text(who.gid), _text(who.gecos), _text(who.home),
                       _text(who.shell)])
    return b"\n".join([*kept, entry]) + b"\n"


def group(image_text: bytes, who: Identity) -> bytes:
    """The image's /etc/group with the user added to each of the user's groups it has, and the
    user's other groups appended (with the host's names)."""
    name = _text(who.name)
    wanted = {_text(g): _text(n) for g, n in who.groups}
    out = []
    for line in _lines(image_text):
        fields = line.split(b":")
        if len(fields) == 4 and fields[2] in wanted:
            members = [m for m in fields[3].split(b",") if m]
            if name not in members:
                members.append(name)
            fields[3] = b",".join(members)
            wanted.pop(fields[2])
            out.append(b":".join(fields))
        else:
            out.append(line)
    out += [b":".join([group_name, b"x", gid, name]) for gid, group_name in wanted.items()]
    return b"\n".join(out) + b"\n"
