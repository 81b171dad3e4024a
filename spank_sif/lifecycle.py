"""The node engine: unlock an image, mount it, release it, and sweep what crashes leave.

``unlock`` (once per step, as root, before tasks fork): open the image as the user, read it, apply
the site policy, snapshot the LUKS2 header and check its KDF costs, attach a loop device, get the
key, and activate dm-crypt from that snapshot.
``mount`` (per task, in the task's own mount namespace). ``release`` (when the step ends) and the
sweeps (job epilog, health checks) undo everything, in order: mounts, mapping, loop device.

Every object is recorded in the state directory *before* it is created and the record is removed
once the object is gone, so a process killed at any point leaves records a sweep can act on.
"""
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import time

from spank_sif import dmcrypt, keys, libcryptsetup, log, loop, luks2, mounts, sif, userfiles
from spank_sif.config import SiteConfig
from spank_sif.loop import LoopDevice
from spank_sif.errors import ImageError, KeyMaterialError, PolicyError, SifError, StateError, SystemSetupError
from spank_sif.secret import Secret
from spank_sif.state import Record, StateDir, check_label, job_id

NAME_PREFIX = "spank-sif-"
_SESSION_NAME = re.compile(rf"{NAME_PREFIX}(?P<job>.+)-(?P<tag>[0-9a-f]{{8}})-[0-9a-f]{{8}}")
# Order of teardown: what uses an object goes before the object.
TEARDOWN_ORDER = ("mount", "mapping", "loop", "session")


class Unlocked:
    """An unlocked image, ready to mount: ``device`` is /dev/mapper/<session> or the loop device.
    (A plain class, not a dataclass: every job step would pay for importing dataclasses.)"""

    __slots__ = ("session", "job", "image", "device", "encrypted", "config", "loop")

    def __init__(self, session: str, job: str, image: str, device: str, encrypted: bool,
                 config: SiteConfig, loop: LoopDevice | None = None):
        self.session, self.job, self.image, self.device = session, job, image, device
        self.encrypted, self.config, self.loop = encrypted, config, loop

    def __repr__(self):
        return f"Unlocked({self.session!r}, image={self.image!r}, device={self.device!r})"

    @property
    def name(self) -> str:
        return self.session


def _state(config: SiteConfig) -> StateDir:
    return StateDir(config.state_dir)


def _checkpoint(step: str) -> None:
    """Fault injection for the crash tests: SPANK_SIF_KILL_AT=<step> kills this process right
    after <step>, as a SIGKILL at that moment would. (The variable comes from the engine's own
    environment, never from the job's.)"""
    if os.environ.get("SPANK_SIF_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def node_tag(host: str | None = None) -> str:
    """Eight hex digits naming this node (a hash of its host name) in mapping names.

    Device-mapper names are global to a kernel. On a cluster each node has its own kernel; where
    several nodes share one (each with its own host name, as in the test suite's multi-node
    cluster), the tag keeps one node's sweeps of lost records off the others' mappings of the
    same job.
    """
    host = os.uname().nodename if host is None else host
    return hashlib.sha256(host.encode()).hexdigest()[:8]


def session_name(job: str) -> str:
    """``spank-sif-<job>-<node tag>-<8 random hex>``: also the mapping's name."""
    # os.urandom, not the secrets module: every job step would pay for importing it.
    return f"{NAME_PREFIX}{check_label(job, 'job label')}-{node_tag()}-{os.urandom(4).hex()}"


def parse_session_name(name: str) -> tuple[str, str] | None:
    """(job label, node tag) of a name ``session_name`` made; None for any other name."""
    match = _SESSION_NAME.fullmatch(name)
    return (match["job"], match["tag"]) if match else None


def _own_lost_mappings(jid: str | None = None, known=frozenset()) -> list[tuple[str, str]]:
    """(name, job id) of the active mappings with this node's tag (of job id ``jid`` if given)
    that no record names: what the sweeps remove without a record. Another node's mapping on a
    shared kernel is never one of them, whatever its job."""
    tag, found = node_tag(), []
    for name in dmcrypt.active_names(NAME_PREFIX + (jid or "")):
        parsed = parse_session_name(name)
        if parsed and parsed[1] == tag and name not in known and jid in (None, job_id(parsed[0])):
            found.append((name, job_id(parsed[0])))
    return found


# ---------------------------------------------------------------- unlock


def _check_location(fd: int, image_path: str, config: SiteConfig) -> str:
    """Where the opened file really is (symlinks resolved by the kernel), checked against the site's
    allowed directories."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:  # ENAMETOOLONG: a real path longer than the kernel's limit (PATH_MAX)
        raise ImageError(f"image {image_path}: its full path is too long for this system "
                         f"({exc.strerror}): move it to a shorter path") from exc
    allowed = config.allowed_image_paths
    if allowed and not any(os.path.commonpath([real, d]) == d for d in allowed):
        raise PolicyError(f"image {image_path} ({real}) is outside the directories this site allows "
                          f"for images ({', '.join(allowed)}): copy it there or ask your admin")
    return real


def _policy(part, image_path: str, config: SiteConfig) -> bool:
    """True if the image is encrypted (LUKS2), False if plain and allowed; refuses the rest.
    (sif.primary_partition already refused gocryptfs and non-squashfs partitions.)"""
    encrypted = part.fs_type == sif.FsType.ENCRYPTED_SQUASHFS
    if not encrypted and not config.allow_unencrypted:
        raise PolicyError(f"image {image_path} is not encrypted and this site only runs encrypted "
                          "images (allow_unencrypted: false)")
    return encrypted


def _kernel_may_mount(fd: int, encrypted: bool, image_path: str, config: SiteConfig) -> None:
    """The site's ``kernel_mount`` policy: may the kernel's squashfs driver parse this file as root?
    Decided on the opened file, before any key work (docs/security-model.md says why)."""
    policy = config.kernel_mount
    if policy == "always" or (policy == "encrypted-only" and encrypted):
        return
    writer = userfiles.who_else_can_write(fd)
    if not writer:
        return
    if policy == "encrypted-only":
        raise PolicyError(f"image {image_path} is not encrypted and can be changed by {writer}; this site "
                          "mounts plain images only when nobody but root can change them (kernel_mount: "
                          "encrypted-only): use an encrypted image, or ask your admin to install this one")
    raise PolicyError(f"image {image_path} can be changed by {writer}; this site mounts only images "
                      f"nobody but root can change (kernel_mount: {policy}): ask your admin to install it")


def _key(image, fd: int, env, user, config: SiteConfig, cwd, source) -> Secret:
    if source is None:
        source = keys.find_key_source(env, list(config.key_variables))
    if source is None:
        names = " or ".join(dict.fromkeys(
            v for v in config.key_variables if v.endswith(("_PASSPHRASE", "_PEM_PATH")))) or "a key variable"
        raise KeyMaterialError(f"the image is encrypted but no key was given: set {names} in the job's "
                               "environment")

    def read_user_file(path: str) -> bytearray:
        return userfiles.read_as_user(path, user, keys.MAX_PEM_FILE, what="PEM key file",
                                      error=KeyMaterialError, cwd=cwd)

    try:
        return keys.luks_passphrase(image, fd, source, read_user_file)
    finally:
        if source.secret is not None:
            source.secret.wipe()


def unlock(image_path: str, user: userfiles.User, env, job: str, config: SiteConfig,
           cwd: str | None = None, source: keys.KeySource | None = None) -> Unlocked:
    """Open ``image_path`` as ``user`` and make its file system ready to mount.

    ``env`` is the job's environment (the key variables are read from it); ``job`` labels the
    objects (``"<jobid>.<stepid>"``, or ``"cli"``). ``source`` overrides the environment (the CLI's
    key flags); ``cwd`` resolves relative paths (the user's). On any failure, everything created so far is
    undone before the error is raised.
    """
    state = _state(config)
    session = session_name(job)
    fd = userfiles.open_as_user(image_path, user, cwd=cwd)
    unlocked = header = None
    try:
        real = _check_location(fd, image_path, config)
        image = sif.read_sif(fd, name=image_path)
        part = image.primary_partition()
        encrypted = _policy(part, image_path, config)
        _kernel_may_mount(fd, encrypted, image_path, config)
        log.verbose(f"{job}: image {image_path} ({real}) opened as {user.name}: partition {part.id}, "
                    f"{'encrypted' if encrypted else 'not encrypted'}, {part.size} bytes")
        if encrypted:
            # The header libcryptsetup will activate from, read now (before any lock) and refused
            # here if no keyslot fits the site's caps: before any key work or kernel object.
            header = libcryptsetup.Header(fd, part.offset, part.size, luks2.site_caps(config))
            dmcrypt.check_kernel()
        st = os.fstat(fd)
        unlocked = Unlocked(session, job, real, "", encrypted, config)
        head = state.record("session", job, session, {
            "image": real, "user": user.name, "uid": user.uid, "pid": os.getpid(),
            "encrypted": encrypted, "status": "opening"})
        _checkpoint("session")
        # The loop record comes first; its device is filled in once known. If we die in between,
        # autoclear frees the device when our fd closes with us (nothing else holds it yet).
        loop_rec = state.record("loop", job, session, {
            "backing_dev": st.st_dev, "backing_ino": st.st_ino, "offset": part.offset, "device": None})
        unlocked.loop = device = loop.attach(fd, part.offset, part.size, real)
        state.update(loop_rec, device=device.path)
        log.verbose(f"{job}: loop device {device.path} over {real} at offset {part.offset}")
        _checkpoint("loop")
        if header is not None:
            unlocked.device = _activate(unlocked, device.path, image, fd, header, env, user, cwd, source)
            # dm-crypt holds the loop device now; dropping our fd arms autoclear for when it goes.
            device.close()
        else:
            unlocked.device = device.path
        state.update(head, status="unlocked", device=unlocked.device)
        _checkpoint("unlocked")
        return unlocked
    except BaseException:
        if unlocked is not None:
            # The original error is the one to report; the records left let a sweep finish.
            with contextlib.suppress(SifError):
                _teardown(state, job, session, unlocked)
        raise
    finally:
        if header is not None:
            header.close()
        os.close(fd)


def _activate(unlocked: Unlocked, loop_path: str, image, fd: int, header, env, user, cwd, source) -> str:
    config = unlocked.config
    state = _state(config)
    with _key(image, fd, env, user, config, cwd, source) as secret:
        _checkpoint("key")
        state.record("mapping", unlocked.job, unlocked.session, {"name": unlocked.session, "loop": loop_path})
        semaphore = dmcrypt.KdfSemaphore(config.state_dir, config.kdf_max_parallel, config.kdf_lock_timeout)
        path = dmcrypt.activate(header, loop_path, unlocked.session, secret.value, semaphore)
    _checkpoint("mapping")
    return path


# ---------------------------------------------------------------- mount


def mount(unlocked: Unlocked, target: str, private: bool = True, create: bool | None = None) -> None:
    """Mount the unlocked image at ``target`` (read-only, nosuid, nodev).

    ``private``: first move this process into a new mount namespace of its own (what each task
    does); otherwise mount in the current namespace (the admin CLI). ``create``: make ``target`` if
    missing (default: only for the site's mount point).
    """
    if create is None:
        create = os.path.normpath(target) == unlocked.config.mount_point
    if private:
        mounts.enter_private_namespace()
    state = _state(unlocked.config)
    key = str(os.getpid())
    state.record("mount", unlocked.job, unlocked.session, {
        "target": os.path.normpath(target), "ns": mounts.namespace_id(), "pid": os.getpid(),
        "device": unlocked.device}, key)
    try:
        mounts.mount_squashfs(unlocked.device, target, create, unlocked.config.setting("mount_point"))
    except BaseException:
        state.remove("mount", unlocked.job, unlocked.session, key)
        raise
    log.debug(f"{unlocked.job}: {unlocked.device} mounted at {target} (pid {key})")
    _checkpoint("mounted")


# ---------------------------------------------------------------- teardown


def _teardown_record(state: StateDir, rec: Record) -> None:
    """Undo one object (idempotent) and drop its record."""
    if rec.kind == "mount":
        if rec.data.get("ns") == mounts.namespace_id():
            mounts.unmount(rec.data["target"])
        # A mount in another namespace (a task's) dies with that namespace; if something keeps the
        # namespace alive, the mapping's deferred removal waits for it.
    elif rec.kind == "mapping":
        dmcrypt.deactivate(rec.data["name"])
    elif rec.kind == "loop" and rec.data.get("device"):
        ident = (rec.data["device"], rec.data["backing_dev"], rec.data["backing_ino"], rec.data["offset"])
        if not loop.wait_released(*ident, timeout=0.5):  # usually auto-cleared by now
            loop.detach_if_ours(*ident)
            loop.wait_released(*ident)
    rec.path.unlink(missing_ok=True)


def _what(rec: Record) -> str:
    """What a record names, for people: the session's name, a mount's target, a loop device."""
    if rec.kind in ("session", "mapping"):
        return rec.session
    return rec.data.get("target") or rec.data.get("device") or "?"


def _teardown(state: StateDir, job: str, session: str, unlocked: Unlocked | None = None) -> list[str]:
    """Undo everything recorded for ``session``, in order; returns what was undone. Errors are
    collected so that one stuck object does not keep the others alive, then the first is raised."""
    recs = [r for r in state.records(job) if r.session == session]
    recs.sort(key=lambda r: TEARDOWN_ORDER.index(r.kind))
    done, first_error = [], None
    for rec in recs:
        if rec.kind == "loop" and unlocked is not None and unlocked.loop is not None:
            unlocked.loop.close()  # our own hold goes first, then autoclear does the rest
        try:
            _teardown_record(state, rec)
            done.append(f"{rec.kind} {_what(rec)}")
            log.verbose(f"{job}: removed {rec.kind} {_what(rec)}")
        except SifError as err:
            log.error(f"{job}: cannot remove {rec.kind} {_what(rec)}: {err}")
            first_error = first_error or err
    if unlocked is not None and unlocked.loop is not None:
        unlocked.loop.close()
    state.drop_job_dir(job)
    if first_error:
        raise first_error
    return done


def _find_session(state: StateDir, what: str) -> tuple[str, str] | None:
    """(job, session) for a session name or a mount point."""
    target = os.path.normpath(what) if what.startswith("/") else None
    for rec in state.records():
        if rec.session == what or (target and rec.kind == "mount" and rec.data.get("target") == target):
            return rec.job, rec.session
    return None


def release(what, config: SiteConfig) -> list[str]:
    """Tear down one session: an ``Unlocked``, a session/mapping name or a mount point."""
    state = _state(config)
    if isinstance(what, Unlocked):
        return _teardown(state, what.job, what.session, what)
    found = _find_session(state, what)
    if found:
        return _teardown(state, *found)
    if what.startswith(NAME_PREFIX) and dmcrypt.is_active(what):  # a mapping whose records are lost
        dmcrypt.deactivate(what)
        return [f"mapping {what}"]
    raise StateError(f"nothing spank-sif opened is known as {what} (see 'spank-sif list')")


def sweep_job(job: str, config: SiteConfig) -> list[str]:
    """Remove everything of job ``job`` (all its steps) on this node: what the job epilog calls."""
    state = _state(config)
    jid = check_label(job_id(job), "job id")
    done, first_error = [], None
    for session in dict.fromkeys(r.session for r in state.records(jid)):
        try:
            done += _teardown(state, jid, session)
        except SifError as err:
            first_error = first_error or err
    for name, _ in _own_lost_mappings(jid):  # this node's mappings whose records were lost
        done.append(f"mapping {name}")
        dmcrypt.deactivate(name)
    state.drop_job_dir(jid)
    if first_error:
        raise first_error
    return done


# ---------------------------------------------------------------- stale jobs


def job_running_here(jid: str) -> bool:
    """Whether job ``jid`` has a step on this node: ``scontrol listpids`` asks the node's own
    slurmstepd sockets (no controller needed). Fails closed: if Slurm cannot be asked, the job is
    taken as running and nothing of it is swept."""
    if not jid.isdigit():
        return True
    try:
        proc = subprocess.run(["scontrol", "listpids", jid], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemSetupError(f"cannot ask Slurm which jobs run here (scontrol listpids): {exc}") from exc
    if proc.returncode == 0:
        return True
    # scontrol prints its table header, then finds no step of the job here and says so on stderr,
    # in words that vary (Slurm 22.05: "JobId=N does not exist on node ...", "There are no steps
    # for job N on node ...", "No job steps exist on this node."). No header: it could not even
    # start (no configuration, ...), and then nothing is known.
    if proc.stdout.lstrip().startswith("PID"):
        return False
    raise SystemSetupError("cannot ask Slurm which jobs run here (scontrol listpids: "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]})")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True


def _interrupted(recs: list[Record]) -> bool:
    """An admin's ``open`` that did not finish: its process is gone, and it never got as far as a
    mount (a finished one is unlocked and mounted, and stays until ``close``)."""
    head = next((r for r in recs if r.kind == "session"), None)
    if head is None:
        return True
    if _pid_alive(head.data.get("pid")):
        return False
    return head.data.get("status") != "unlocked" or not any(r.kind == "mount" for r in recs)


def sweep_stale(config: SiteConfig, is_running=job_running_here) -> list[str]:
    """Sweep every job that no longer runs here; for sessions not tied to a Slurm job (the admin
    CLI's), sweep those whose opening process died before finishing."""
    state = _state(config)
    done = []
    for jid in state.jobs():
        if jid.isdigit():
            if not is_running(jid):
                done += sweep_job(jid, config)
            continue
        by_session: dict[str, list[Record]] = {}
        for rec in state.records(jid):
            by_session.setdefault(rec.session, []).append(rec)
        for session, recs in by_session.items():
            if _interrupted(recs):
                done += _teardown(state, jid, session)
        state.drop_job_dir(jid)
    known = {r.session for r in state.records()}
    for name, jid in _own_lost_mappings(known=known):  # mappings nobody recorded (or records lost)
        if jid.isdigit() and not is_running(jid):
            dmcrypt.deactivate(name)
            done.append(f"mapping {name}")
    return done


# ---------------------------------------------------------------- listing


def list_active(config: SiteConfig) -> list[dict]:
    """One entry per session: name, job, image, user, status, device, mounts, age (seconds)."""
    state = _state(config)
    sessions: dict[str, dict] = {}
    now = time.time()
    for rec in state.records():
        entry = sessions.setdefault(rec.session, {
            "name": rec.session, "job": rec.job, "image": None, "user": None, "status": "partial",
            "device": None, "mounts": [], "age": 0.0})
        if rec.kind == "session":
            entry.update(image=rec.data.get("image"), user=rec.data.get("user"),
                         status=rec.data.get("status"), device=rec.data.get("device"),
                         age=round(now - rec.created, 1))
        elif rec.kind == "mount":
            entry["mounts"].append(rec.data.get("target"))
    return sorted(sessions.values(), key=lambda e: -e["age"])
