"""Records of what the engine created, so that a crash at any point leaves enough to clean up.

Before the engine creates a loop device, a mapping or a mount it writes a small JSON record here;
when the object is gone it deletes the record. A sweep after a crash reads the records and removes
what they name. Layout: ``<state_dir>/<job id>/<session>~<kind>[~<key>].json``, root only (0700).
Records never hold a secret: names, device paths, inode numbers, pids and times only (a mapping
that later steps of the job may reuse also carries a salted HMAC of its key, to recognise the same
key again: lifecycle.py).

Kinds: ``session`` (what was opened, by whom), ``loop``, ``mapping``, ``mount`` (one per task), and
``hold`` (one per step using a shared mapping: step label and slurmstepd pid). Lock files
``<job dir>/.<name>.lock`` serialise steps of one job that may share a mapping.
"""
import contextlib
import fcntl
import json
import os
import re
import stat
import time
from typing import NamedTuple
from pathlib import Path

from spank_sif.errors import StateError

KINDS = ("session", "loop", "mapping", "mount", "hold")
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def job_id(job: str) -> str:
    """The job part of a job label: ``"1234.0"`` -> ``"1234"``, ``"cli"`` -> ``"cli"``."""
    return job.split(".", 1)[0]


def check_label(value: str, what: str) -> str:
    if not _SAFE.fullmatch(value or ""):
        raise StateError(f"invalid {what} {value!r}: use letters, digits and _ . + - only")
    return value


class Record(NamedTuple):
    kind: str
    job: str
    session: str
    key: str
    data: dict
    path: Path

    @property
    def created(self) -> float:
        return self.data.get("created", 0.0)


class StateDir:
    def __init__(self, path: str):
        self.path = Path(path)

    def _secure_dir(self, path: Path) -> Path:
        """Create ``path`` (0700, ours) or check an existing one: no symlink, nobody else's."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateError(f"cannot create state directory {path}: {exc.strerror}") from exc
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise StateError(f"state directory {path} is not a directory owned by uid {os.geteuid()}: "
                             "remove it or fix 'state_dir' in the site configuration")
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
        return path

    def job_dir(self, job: str, create: bool = False) -> Path:
        jid = check_label(job_id(job), "job id")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._secure_dir(self.path)
            return self._secure_dir(self.path / jid)
        return self.path / jid

    def _file(self, kind: str, job: str, session: str, key: str, create: bool = False) -> Path:
        assert kind in KINDS, kind
        name = "~".join([check_label(session, "session name"), kind] + ([check_label(key, "key")] if key else []))
        return self.job_dir(job, create) / f"{name}.json"

    def record(self, kind: str, job: str, session: str, data: dict, key: str = "") -> Record:
        """Write (or replace) a record atomically and return it."""
        path = self._file(kind, job, session, key, create=True)
        full = {"kind": kind, "job": job, "session": session, "key": key, "created": time.time(), **data}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(full, f, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            raise StateError(f"cannot write state record {path}: {exc.strerror}") from exc
        return Record(kind, job, session, key, full, path)

    def update(self, rec: Record, **changes) -> Record:
        data = {k: v for k, v in {**rec.data, **changes}.items()
                if k not in ("kind", "job", "session", "key")}
        return self.record(rec.kind, rec.job, rec.session, data, rec.key)

    def remove(self, kind: str, job: str, session: str, key: str = "") -> None:
        """Delete a record; deleting one that is already gone is fine."""
        self._file(kind, job, session, key).unlink(missing_ok=True)

    def jobs(self) -> list[str]:
        """Job ids that have a directory here."""
        try:
            return sorted(e.name for e in os.scandir(self.path) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except PermissionError as exc:
            raise StateError(f"cannot read the state directory {self.path}: run this as root") from exc

    def records(self, job: str | None = None) -> list[Record]:
        """Every readable record (of one job id if given), oldest first."""
        out = []
        for jid in [job_id(job)] if job else self.jobs():
            try:
                entries = list(os.scandir(self.path / jid))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(".json"):
                    continue
                try:
                    with open(entry.path, encoding="utf-8") as f:
                        data = json.load(f)
                    out.append(Record(data["kind"], data["job"], data["session"], data.get("key", ""),
                                      data, Path(entry.path)))
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # half-written or foreign file: ignore, the sweep removes the directory
        return sorted(out, key=lambda r: (r.created, r.path.name))

    @contextlib.contextmanager
    def job_lock(self, job: str, name: str, timeout: float):
        """Hold an exclusive lock of job ``job`` named ``name`` (a flock on ``<job dir>/.<name>.lock``);
        yields False, without the lock, if another process held it for ``timeout`` seconds."""
        path = self.job_dir(job, create=True) / f".{check_label(name, 'lock name')}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open lock file {path}: {exc.strerror}") from exc
        try:
            # Polled, not blocking: a blocking flock cannot be given a deadline without a signal,
            # and slurmstepd's threads are no place for signal handlers.
            deadline, delay = time.monotonic() + timeout, 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
            yield True
        finally:
            os.close(fd)

    def drop_job_dir(self, job: str) -> bool:
        """Remove a job's directory if it holds no record any more (stray temp files and the job's
        lock files go too: with no record left, no step of the job is using them)."""
        path = self.job_dir(job)
        try:
            entries = list(os.scandir(path))
            if any(not e.name.startswith(".") for e in entries):
                return False  # records left: a lock may be in use
            for entry in entries:
                if entry.name.endswith((".tmp", ".lock")):
                    os.unlink(entry.path)
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False
