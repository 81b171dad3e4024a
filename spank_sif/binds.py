"""The host paths bound into a step's containers: checked once per step, opened again in each task.

- The site's binds (``container_binds``) are the admin's paths: each task opens them as root,
  following the admin's symbolic links; a source missing on a node is skipped.
- The user's home (``~`` in that list) and every ``--sif-binds`` source are opened *as the user*
  (spank_sif.userfiles) once per step, before any task forks: a user can bind only what they can
  read themselves, the sources of ``--sif-binds`` must be under the site's ``allowed_bind_paths``,
  and a mistake stops the step with one line before anything runs.
- The submit directory (``.``) is the directory Slurm has just entered, as the user, in each task.

A mount can only be bound from the mount namespace it lives in, and each task makes its own: a
descriptor opened by slurmstepd cannot be bound in a task. So each task opens the user's source
again by the real path the user's open found, without following any symbolic link, and binds it
only if it is the very file the user opened (same device and inode): swapping a path or a link
after the check cannot make root bind anything else.
"""
import contextlib
import os
from typing import NamedTuple

from spank_sif import log, rootfs, userfiles
from spank_sif.errors import PolicyError, SifError, UsageError
from spank_sif.options import HOME, WORKDIR, BindSpec


class Bind(NamedTuple):
    """A bind source and where it goes."""

    source: str     # as given (the site's path, the user's, WORKDIR)
    target: str
    readonly: bool
    users: bool     # the user's own: opened as the user per step, nosuid and nodev inside
    fd: int | None = None  # the user's open of it (the identity each task checks against)
    real: str = ""         # where that open led (symbolic links resolved)
    # The user asked for it (--sif-binds): a target the image cannot take fails the task. The site's
    # binds are skipped instead, with a line in slurmd's log (an image may lack a place for them).
    required: bool = False


def open_binds(site: tuple, user_binds: list[BindSpec], user: userfiles.User, home: str,
               allowed: tuple) -> list[Bind]:
    """Every bind of a step, site binds first, then the user's (in their order); the user's ones
    opened as the user and checked."""
    binds: list[Bind] = []
    try:
        for spec in site:
            bind = _site_bind(spec, user, home)
            if bind is not None:
                binds.append(bind)
        for spec in user_binds:
            binds.append(_user_bind(spec, user, allowed))
    except BaseException:
        close(binds)
        raise
    return binds


def _site_bind(spec: BindSpec, user: userfiles.User, home: str) -> Bind | None:
    if spec.source == WORKDIR:
        return Bind(WORKDIR, WORKDIR, spec.readonly, True)
    if spec.source == HOME:
        try:
            return _opened(home, home, spec.readonly, user, "home directory")
        except SifError as err:
            log.verbose(f"home directory not bound: {err}")
            return None
    return Bind(spec.source, spec.target, spec.readonly, False)


def _user_bind(spec: BindSpec, user: userfiles.User, allowed: tuple) -> Bind:
    bind = _opened(spec.source, spec.target, spec.readonly, user, "bind source")._replace(required=True)
    if allowed and not any(os.path.commonpath([bind.real, d]) == d for d in allowed):
        close([bind])
        raise PolicyError(f"bind source {spec.source} ({bind.real}) is outside the directories this "
                          f"site allows for binds ({', '.join(allowed)}): ask your admin")
    return bind


def _opened(source: str, target: str, readonly: bool, user: userfiles.User, what: str) -> Bind:
    fd = userfiles.open_as_user(source, user, what=what, error=UsageError, directory_ok=True)
    return Bind(source, target, readonly, True, fd, os.readlink(f"/proc/self/fd/{fd}"))


def open_in_task(bind: Bind) -> int | None:
    """In a task's own mount namespace, as root: an O_PATH descriptor of ``bind``'s source to bind
    from, or None to skip it (a site path this node lacks)."""
    if not bind.users:
        try:
            return os.open(bind.source, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            log.debug(f"site bind {bind.source} skipped: {exc.strerror}")
            return None
    assert bind.fd is not None
    try:
        fd = rootfs.open_in_root(rootfs.AT_FDCWD, bind.real, os.O_PATH,
                                 rootfs.RESOLVE_NO_SYMLINKS | rootfs.RESOLVE_NO_MAGICLINKS)
    except OSError as exc:
        raise UsageError(f"bind source {bind.source} changed while the job started ({exc.strerror}); "
                         "try again") from exc
    if not _same_file(fd, bind.fd):
        os.close(fd)
        raise UsageError(f"bind source {bind.source} was replaced while the job started; try again")
    return fd


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def close(binds: list[Bind]) -> None:
    for bind in binds:
        if bind.fd is not None:
            with contextlib.suppress(OSError):
                os.close(bind.fd)
