"""The node engine: unlock an image, mount it, release it, and sweep what crashes leave.

``unlock`` (once per step, as root, before tasks fork): open the image as the user, read it, apply
the site policy, snapshot the LUKS2 header and check its KDF costs, attach a loop device, get the
key, and activate dm-crypt from that snapshot.
``mount`` (per task, in the task's own mount namespace). ``release`` (when the step ends) and the
sweeps (job epilog, health checks) undo everything, in order: mounts, mapping, loop device.

One unlock per job per node: a later step of the same Slurm job, for the same user, the same image
file and the same key, joins the mapping an earlier step made (a ``hold`` record per step) instead
of deriving the key again; the mapping then stays until the job's epilog. Each mapping's session
record keeps a salted HMAC of the key it was opened with, so that a step is let in only with that
key: a step with another key unlocks afresh with it (and fails as ever if it is wrong).

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
from typing import NamedTuple

from spank_sif import dmcrypt, keys, libcryptsetup, log, loop, luks2, mounts, policy, sif, userfiles
from spank_sif.config import SiteConfig
from spank_sif.loop import LoopDevice
from spank_sif.errors import KeyMaterialError, SifError, StateError, SystemSetupError
from spank_sif.secret import Secret
from spank_sif.state import Record, StateDir, check_label, job_id

NAME_PREFIX = "spank-sif-"
_SESSION_NAME = re.compile(rf"{NAME_PREFIX}(?P<job>.+)-(?P<tag>[0-9a-f]{{8}})-[0-9a-f]{{8}}")
# Order of teardown: what uses an object goes before the object.
TEARDOWN_ORDER = ("hold", "mount", "mapping", "loop", "session")


class Unlocked:
    """An unlocked image, ready to mount: ``device`` is /dev/mapper/<session> or the loop device.
    (A plain class, not a dataclass: every job step would pay for importing dataclasses.)"""

    __slots__ = ("session", "job", "image", "device", "encrypted", "config", "loop", "holder")

    def __init__(self, session: str, job: str, image: str, device: str, encrypted: bool,
                 config: SiteConfig, loop: LoopDevice | None = None):
        self.session, self.job, self.image, self.device = session, job, image, device
        self.encrypted, self.config, self.loop = encrypted, config, loop
        # The key of this step's hold record if the mapping is shared with the job's other steps
        # (then ``job`` is the label of the step that made it); None if the step owns it alone.
        self.holder: str | None = None

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


def _key(image, fd: int, env, user, config: SiteConfig, cwd, source) -> Secret:
    if source is None:
        source = policy.key_source(env, config)

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
    undone before the error is raised. A step of a Slurm job may get a mapping an earlier step of
    the job made (``reuse_mappings``); ``Unlocked.holder`` says so.
    """
    fd = userfiles.open_as_user(image_path, user, cwd=cwd)
    header = secret = None
    try:
        real = policy.check_location(fd, image_path, config)
        image = sif.read_sif(fd, name=image_path)
        part = image.primary_partition()
        encrypted = policy.check_encryption(part, image_path, config)
        policy.check_kernel_mount(fd, encrypted, image_path, config)
        log.verbose(f"{job}: image {image_path} ({real}) opened as {user.name}: partition {part.id}, "
                    f"{'encrypted' if encrypted else 'not encrypted'}, {part.size} bytes")
        opening = _Opening(fd, real, part, user, job, config)
        if not encrypted:
            return _unlock_afresh(opening)
        # The header libcryptsetup will activate from, read now (before any lock) and refused
        # here if no keyslot fits the site's caps: before any key work or kernel object.
        header = libcryptsetup.Header(fd, part.offset, part.size, luks2.site_caps(config))
        dmcrypt.check_kernel()
        secret = _key(image, fd, env, user, config, cwd, source)
        jid = job_id(job)
        if not (config.reuse_mappings and jid.isdigit()):
            return _unlock_afresh(opening, header, secret)
        return _unlock_shared(opening, header, secret)
    finally:
        if secret is not None:
            secret.wipe()
        if header is not None:
            header.close()
        os.close(fd)


class _Opening(NamedTuple):
    """What ``unlock`` found out about the image before any object is made."""
    fd: int           # the image, opened as the user
    real: str         # its real path
    part: sif.Descriptor  # its primary partition
    user: userfiles.User
    job: str
    config: SiteConfig


def _unlock_afresh(opening: _Opening, header=None, secret: Secret | None = None,
                   reuse: dict | None = None) -> Unlocked:
    """Make the step's own loop device (and mapping, for an encrypted image). ``reuse``: what the
    session record keeps so that later steps of the job may join it (then this step holds it)."""
    fd, part, job, config = opening.fd, opening.part, opening.job, opening.config
    state = _state(config)
    session = session_name(job)
    st = os.fstat(fd)
    unlocked = Unlocked(session, job, opening.real, "", header is not None, config)
    try:
        head = state.record("session", job, session, {
            "image": opening.real, "user": opening.user.name, "uid": opening.user.uid, "pid": os.getpid(),
            "encrypted": header is not None, "status": "opening", **({"reuse": reuse} if reuse else {})})
        _checkpoint("session")
        # The loop record comes first; its device is filled in once known. If we die in between,
        # autoclear frees the device when our fd closes with us (nothing else holds it yet).
        loop_rec = state.record("loop", job, session, {
            "backing_dev": st.st_dev, "backing_ino": st.st_ino, "offset": part.offset, "device": None})
        unlocked.loop = device = loop.attach(fd, part.offset, part.size, opening.real)
        state.update(loop_rec, device=device.path)
        log.verbose(f"{job}: loop device {device.path} over {opening.real} at offset {part.offset}")
        _checkpoint("loop")
        if header is not None and secret is not None:
            unlocked.device = _activate(unlocked, device.path, header, secret)
            # dm-crypt holds the loop device now; dropping our fd arms autoclear for when it goes.
            device.close()
        else:
            unlocked.device = device.path
        if reuse is not None:
            unlocked.holder = _hold(state, job, session)
        state.update(head, status="unlocked", device=unlocked.device)
        _checkpoint("unlocked")
        return unlocked
    except BaseException:
        # The original error is the one to report; the records left let a sweep finish.
        with contextlib.suppress(SifError):
            _teardown(state, job, session, unlocked)
        raise


def _activate(unlocked: Unlocked, loop_path: str, header, secret: Secret) -> str:
    config = unlocked.config
    state = _state(config)
    _checkpoint("key")
    state.record("mapping", unlocked.job, unlocked.session, {"name": unlocked.session, "loop": loop_path})
    semaphore = dmcrypt.KdfSemaphore(config.state_dir, config.kdf_max_parallel, config.kdf_lock_timeout)
    path = dmcrypt.activate(header, loop_path, unlocked.session, secret.value, semaphore)
    _checkpoint("mapping")
    return path


# ---------------------------------------------------------------- one unlock per job per node


def _identity(opening: _Opening) -> dict:
    """What makes an image "the same" for reuse: the user, and the file the user's open reached
    (device, inode, size, modification and change times: a replaced or rewritten file differs;
    the change time cannot be set back by the user) and its partition."""
    st = os.fstat(opening.fd)
    return {"uid": opening.user.uid, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "offset": opening.part.offset, "length": opening.part.size}


def key_fingerprint(salt: bytes, secret: Secret) -> str:
    """HMAC-SHA256 of the LUKS passphrase (the unwrapped key, in PEM mode) under a random salt of
    its mapping: recognises the key again without keeping it."""
    import hmac  # only steps that may share a mapping need it
    return hmac.digest(salt, secret.value, "sha256").hex()


def _same_key(reuse: dict, secret: Secret) -> bool:
    import hmac
    try:
        salt = bytes.fromhex(reuse["salt"])
        return hmac.compare_digest(key_fingerprint(salt, secret), reuse["fingerprint"])
    except (KeyError, TypeError, ValueError):
        return False


def _lock_name(identity: dict) -> str:
    import hashlib
    text = ",".join(f"{k}={identity[k]}" for k in sorted(identity))
    return "reuse-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _unlock_shared(opening: _Opening, header, secret: Secret) -> Unlocked:
    """Join the job's mapping of this image made with this key, or make one the job's later steps
    may join. Steps racing for the same image wait for each other (one key derivation, not one
    each); the holder of the lock may wait for the node's KDF slot (``kdf_lock_timeout``) and then
    derive, so the others wait up to twice that."""
    config, job = opening.config, opening.job
    state = _state(config)
    identity = _identity(opening)
    timeout = 2 * config.kdf_lock_timeout
    with state.job_lock(job, _lock_name(identity), timeout) as locked:
        if not locked:
            raise SystemSetupError(
                f"gave up after {timeout:g} s waiting for another step of this job that unlocks the same "
                "image on this node: try again later, or ask your admin (kdf_lock_timeout)")
        found = _shared_mapping(state, job, identity, secret)
        if found is not None:
            return _join(state, found, job, config)
        salt = os.urandom(16)
        reuse = {**identity, "salt": salt.hex(), "fingerprint": key_fingerprint(salt, secret)}
        return _unlock_afresh(opening, header, secret, reuse)


def _shared_mapping(state: StateDir, job: str, identity: dict, secret: Secret) -> Record | None:
    """The session record of a live mapping of this job for this identity and this key, if any."""
    for rec in state.records(job):
        reuse = rec.data.get("reuse")
        if (rec.kind != "session" or rec.data.get("status") != "unlocked" or not isinstance(reuse, dict)
                or any(reuse.get(k) != v for k, v in identity.items())):
            continue
        if not _same_key(reuse, secret):
            continue  # another key: this step unlocks with its own (and fails if it is wrong)
        device = rec.data.get("device")
        if device and dmcrypt.is_active(rec.session) and os.path.exists(device):
            return rec
    return None


def _hold(state: StateDir, step: str, session: str) -> str:
    """Record that ``step`` (this slurmstepd) uses mapping ``session``; returns the record's key."""
    key = f"{step}+{os.getpid()}"
    state.record("hold", step, session, {"step": step, "pid": os.getpid()}, key)
    return key


def _join(state: StateDir, rec: Record, step: str, config: SiteConfig) -> Unlocked:
    unlocked = Unlocked(rec.session, rec.job, rec.data["image"], rec.data["device"], True, config)
    unlocked.holder = _hold(state, step, rec.session)
    log.verbose(f"{step}: reusing mapping {rec.session} of step {rec.job} (same image, user and key)")
    _checkpoint("joined")
    return unlocked


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
        "device": unlocked.device, "holder": unlocked.holder}, key)
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
    if rec.kind == "hold":
        return f"of step {rec.data.get('step', '?')}"
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
    """Tear down one session: an ``Unlocked``, a session/mapping name or a mount point. A step's
    ``Unlocked`` whose mapping the job's steps share lets go of it only (``let_go``)."""
    state = _state(config)
    if isinstance(what, Unlocked):
        if what.holder is not None:
            return let_go(what, state)
        return _teardown(state, what.job, what.session, what)
    found = _find_session(state, what)
    if found:
        return _teardown(state, *found)
    if what.startswith(NAME_PREFIX) and dmcrypt.is_active(what):  # a mapping whose records are lost
        dmcrypt.deactivate(what)
        return [f"mapping {what}"]
    raise StateError(f"nothing spank-sif opened is known as {what} (see 'spank-sif list')")


def let_go(unlocked: Unlocked, state: StateDir) -> list[str]:
    """A step is done with a mapping the job's steps share: its hold record and its tasks' mount
    records go (the mounts die with the tasks' namespaces); the mapping stays for the job's later
    steps until the job's epilog."""
    done = []
    for rec in state.records(unlocked.job):
        ours = rec.key == unlocked.holder if rec.kind == "hold" else (
            rec.kind == "mount" and rec.data.get("holder") == unlocked.holder)
        if rec.session == unlocked.session and ours:
            _teardown_record(state, rec)
            done.append(f"{rec.kind} {_what(rec)}")
    log.verbose(f"{unlocked.holder}: let go of mapping {unlocked.session}; it stays for the job's other steps")
    return done


def _holders_alive(recs: list[Record]) -> list[str]:
    return [r.data.get("step", "?") for r in recs if r.kind == "hold" and _pid_alive(r.data.get("pid"))]


def sweep_job(job: str, config: SiteConfig) -> list[str]:
    """Remove everything of job ``job`` (all its steps) on this node: what the job epilog calls."""
    state = _state(config)
    jid = check_label(job_id(job), "job id")
    done, first_error = [], None
    for session in dict.fromkeys(r.session for r in state.records(jid)):
        alive = _holders_alive([r for r in state.records(jid) if r.session == session])
        if alive:
            # Records go now; the kernel removes the mapping (deferred) and the loop device
            # (autoclear) when the last of these steps' tasks, which have it mounted, ends.
            log.info(f"{jid}: removing mapping {session} while step(s) {', '.join(alive)} still use it: "
                     "it goes when their tasks end")
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
    """One entry per session: name, job, image, user, status, device, mounts, age (seconds), and the
    steps holding a mapping the job's steps share."""
    state = _state(config)
    sessions: dict[str, dict] = {}
    now = time.time()
    for rec in state.records():
        entry = sessions.setdefault(rec.session, {
            "name": rec.session, "job": rec.job, "image": None, "user": None, "status": "partial",
            "device": None, "mounts": [], "age": 0.0, "steps": []})
        if rec.kind == "session":
            entry.update(image=rec.data.get("image"), user=rec.data.get("user"),
                         status=rec.data.get("status"), device=rec.data.get("device"),
                         age=round(now - rec.created, 1))
        elif rec.kind == "mount":
            entry["mounts"].append(rec.data.get("target"))
        elif rec.kind == "hold":
            entry["steps"].append(rec.data.get("step"))
    return sorted(sessions.values(), key=lambda e: -e["age"])
