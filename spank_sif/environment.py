"""A container task's environment: the image's own, then the job's, then ``SIF_IMAGE_ROOT=/``.

Apptainer images carry their environment as shell scripts (``/.singularity.d/env/*.sh``, from a
definition file's ``%environment`` and the image's build), which Apptainer sources before running
a command. Here they run the same way, in each task, inside the container, as the user: the image's
``/bin/sh`` sources them in name order with the job's environment (minus the site's host-only
variables, plus a default ``PATH``), bounded in time.

The result is read without parsing any shell's output: once the scripts are sourced, the shell
``exec``s a second ``/bin/sh`` that says it is ready and waits, and the kernel's copy of that
process's initial environment (``/proc/<pid>/environ``) is exactly what the scripts exported.

What the task gets: every variable the scripts defined that the job does not have; the host-only
variables (``PATH`` first) only as the image defines them; the job's other variables unchanged
(they win over the image's, as with pyxis); ``SIF_IMAGE_ROOT=/``.
"""
import contextlib
import fcntl
import os
import select
import signal
import time

from spank_sif.errors import ImageError

ENV_DIR = "/.singularity.d/env"
SHELL = "/bin/sh"
# Apptainer's PATH for a container whose scripts set none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_ROOT = "SIF_IMAGE_ROOT"
# What shells add to their children's environment by themselves: not the image's.
SHELL_NOISE = frozenset({"_", "SHLVL", "PWD", "OLDPWD"})
READY_FD, WAIT_FD = 3, 4
# Sourced by the image's /bin/sh. Before each script it names it on READY_FD (so that a failure or
# a hang can be blamed on the right one); at the end a fresh shell carries the exported variables,
# says "ready" and waits until the reader has its environment.
SCRIPT = """\
for f in {env_dir}/*.sh; do
  if [ -f "$f" ]; then echo "S $f" >&{ready}; . "$f"; fi
done
exec {shell} -c 'echo R >&{ready}; read x <&{wait}'
"""
OUTPUT_KEPT = 4096  # the end of the scripts' output, for the message when they fail


class EnvironmentScriptError(ImageError):
    """An environment script of the image failed or did not finish in time."""


class NoShellError(ImageError):
    """The image has no /bin/sh that runs (its environment scripts cannot be run)."""


def has_scripts(env_dir: str = ENV_DIR) -> bool:
    try:
        return any(name.endswith(".sh") for name in os.listdir(env_dir))
    except OSError:
        return False


def shell_input(job_env: dict[str, str], host_only) -> dict[str, str]:
    """The environment the scripts start from: the job's without host-only variables, and PATH."""
    env = {k: v for k, v in job_env.items() if k not in host_only}
    env["PATH"] = DEFAULT_PATH
    return env


def changes(job_env: dict[str, str], evaluated: dict[str, str], host_only) -> tuple[dict[str, str], list[str]]:
    """What to set and unset in the task's environment: ``evaluated`` is the environment the
    scripts ended with (or ``{"PATH": DEFAULT_PATH}`` when they cannot run)."""
    to_set, to_unset = {}, []
    for name in host_only:
        if name in evaluated:
            to_set[name] = evaluated[name]
        elif name in job_env:
            to_unset.append(name)
    for name, value in evaluated.items():
        if name not in job_env and name not in host_only and name not in SHELL_NOISE:
            to_set[name] = value
    to_set[IMAGE_ROOT] = "/"
    return to_set, to_unset


def _parse_environ(data: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env.setdefault(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
    return env


def evaluate(start: dict[str, str], timeout: float, proc_fd: int, env_dir: str = ENV_DIR,
             shell: str = SHELL) -> dict[str, str]:
    """Source the image's environment scripts with ``start`` (in the current root, as the current
    user) and return the environment they exported. ``proc_fd``: a /proc directory descriptor (the
    container may have no /proc). NoShellError: the image has no /bin/sh that runs."""
    script = SCRIPT.format(env_dir=env_dir, shell=shell, ready=READY_FD, wait=WAIT_FD)
    ready_r, ready_w = _pipe()
    wait_r, wait_w = _pipe()
    out_r, out_w = _pipe()
    null_r, null_w = _pipe()
    os.close(null_w)  # the scripts read an empty stdin
    try:
        # Its own session: on a timeout, the scripts' children go with the shell.
        pid = os.posix_spawn(shell, [shell, "-c", script], start,
                             file_actions=[(os.POSIX_SPAWN_DUP2, null_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                                           (os.POSIX_SPAWN_DUP2, out_w, 2),
                                           (os.POSIX_SPAWN_DUP2, ready_w, READY_FD),
                                           (os.POSIX_SPAWN_DUP2, wait_r, WAIT_FD)],
                             setsid=True)
    except BaseException as exc:
        for fd in (ready_r, ready_w, wait_r, wait_w, out_r, out_w, null_r):
            os.close(fd)
        if isinstance(exc, OSError):
            raise NoShellError(f"the image's {shell} cannot run ({exc.strerror})") from exc
        raise
    for fd in (null_r, out_w, ready_w, wait_r):
        os.close(fd)
    deadline = time.monotonic() + timeout
    reaped = False
    try:
        said, output = _read_until_ready(ready_r, out_r, deadline)
        if said.endswith(b"R\n"):
            return _environ(pid, proc_fd)
        status = _wait(pid, deadline)
        reaped = status is not None
        if status is None:
            raise EnvironmentScriptError(f"{_running(said)} did not finish within {timeout:g} s: fix "
                                         "the image, or ask your admin about container_env_timeout")
        tail = output.decode("utf-8", "replace").strip().splitlines()
        why = f": {tail[-1]}" if tail else ""
        raise EnvironmentScriptError(f"{_running(said)} failed ({_status_text(status)}){why}")
    finally:
        for fd in (ready_r, out_r, wait_w):
            os.close(fd)
        if not reaped:
            _stop(pid)


def _pipe() -> tuple[int, int]:
    """A pipe whose ends are above the descriptors the shell gets (0 to 4), so that placing them
    there cannot overwrite one with another."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends[0], ends[1]


def _read_until_ready(ready_r: int, out_r: int, deadline: float) -> tuple[bytes, bytes]:
    """What the shell said on READY_FD and the end of its output, until it is ready, has closed
    both, or the deadline passed."""
    said, output = b"", b""
    poller = select.poll()  # not select(): slurmstepd's descriptors may run past FD_SETSIZE
    for fd in (ready_r, out_r):
        poller.register(fd, select.POLLIN)
    open_fds = 2
    while open_fds and not said.endswith(b"R\n"):
        remaining = deadline - time.monotonic()
        ready = poller.poll(remaining * 1000) if remaining > 0 else []
        if not ready:
            break
        for fd, _ in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                open_fds -= 1
            elif fd == ready_r:
                said += chunk
            else:
                output = (output + chunk)[-OUTPUT_KEPT:]
    return said, output


def _environ(pid: int, proc_fd: int) -> dict[str, str]:
    try:
        fd = os.open(f"{pid}/environ", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        try:
            data = b""
            while chunk := os.read(fd, 1 << 20):
                data += chunk
        finally:
            os.close(fd)
    except OSError as exc:
        raise EnvironmentScriptError(f"cannot read the environment the image's scripts made: {exc.strerror}") from exc
    return _parse_environ(data)


def _wait(pid: int, deadline: float) -> int | None:
    """The shell's wait status once it exits, or None if it has not by the deadline (a script may
    have closed its descriptors and gone on running)."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def _stop(pid: int) -> None:
    """End the shell's session (the shell and whatever the scripts started) and reap the shell."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _running(said: bytes) -> str:
    names = [line[2:] for line in said.decode("utf-8", "replace").splitlines() if line.startswith("S ")]
    return f"the image's environment script {names[-1]}" if names else "the image's environment set-up"


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
