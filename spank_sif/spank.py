"""The only seam between spank-sif and the SPANK API: thin, typed wrappers over the C shim.

Everything the plugin asks Slurm goes through here, so unit tests replace this module (and nothing
else) with a fake. The ``spank_t`` handle ``sp`` is opaque and valid only during the callback that
received it: pass it through, never keep it.

The compiled module ``spank_sif._plugin`` is imported lazily, so the rest of the package (and its
tests) works where the plugin has not been built.
"""
from spank_sif.errors import SifError, printable
from spank_sif.secret import Secret, wipe

CONTEXTS = {0: "error", 1: "local", 2: "remote", 3: "allocator", 4: "slurmd", 5: "job_script"}
LOG_LEVELS = {"error": 0, "info": 1, "verbose": 2, "debug": 3}
_ENV_BUFFER = 64 * 1024          # key variables (PEM data) can be a few KiB
_ENV_BUFFER_MAX = 1024 * 1024


class SpankCallError(SifError):
    """A SPANK API call failed (a bug or a Slurm that behaves unlike 22.05)."""

    exit_code = 1


def _lib():
    import spank_sif._plugin as compiled  # the .so itself when running inside Slurm
    return compiled.lib


def _ffi():
    import spank_sif._plugin as compiled
    return compiled.ffi


def _check(rc: int, what: str) -> None:
    if rc != _lib().ESPANK_SUCCESS:
        raise SpankCallError(f"{what} failed (SPANK error {rc})")


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


# ------------------------------------------------------------------ process-wide facts

def context() -> str:
    """'local' (srun), 'allocator' (sbatch, salloc), 'remote' (slurmstepd), 'job_script', 'slurmd'."""
    return CONTEXTS.get(_lib().shim_context(), "error")


def option_value() -> str | None:
    """The --sif-image value the C option callback recorded (None if the option was not given)."""
    value = _lib().shim_option_value()
    return None if value == _ffi().NULL else _ffi().string(value).decode("utf-8", "surrogateescape")


def option_conflict() -> bool:
    """True when Slurm handed the remote option callback two different values."""
    return bool(_lib().shim_option_conflict())


def state_dir() -> str:
    """The state directory the C side checks before starting Python in the job epilog."""
    return _ffi().string(_lib().shim_state_dir()).decode()


# ------------------------------------------------------------------ spank_get_item

def _u32(sp, item_name: str) -> int:
    out = _ffi().new("uint32_t *")
    _check(_lib().shim_item_u32(sp, getattr(_lib(), item_name), out), f"spank_get_item({item_name})")
    return int(out[0])


def job_id(sp) -> int:
    return _u32(sp, "S_JOB_ID")


def step_id(sp) -> int:
    return _u32(sp, "S_JOB_STEPID")


def uid(sp) -> int:
    out = _ffi().new("uint32_t *")
    _check(_lib().shim_item_uid(sp, out), "spank_get_item(S_JOB_UID)")
    return int(out[0])


def gid(sp) -> int:
    out = _ffi().new("uint32_t *")
    _check(_lib().shim_item_gid(sp, out), "spank_get_item(S_JOB_GID)")
    return int(out[0])


def task_id(sp) -> int:
    """The task's node-local id (task callbacks only)."""
    out = _ffi().new("int *")
    _check(_lib().shim_item_int(sp, _lib().S_TASK_ID, out), "spank_get_item(S_TASK_ID)")
    return int(out[0])


# ------------------------------------------------------------------ job environment (remote only)

def getenv(sp, name: str) -> str | None:
    """A variable of the job's environment (remote context), None if unset. Never for a variable
    that may hold a key: that is ``getenv_secret``."""
    value = getenv_secret(sp, name)
    if value is None:
        return None
    with value:
        return value.value.decode("utf-8", "surrogateescape")


def getenv_secret(sp, name: str) -> Secret | None:
    """A variable of the job's environment as a ``Secret``, never a ``str`` (which Python cannot
    wipe): Slurm copies the value into a buffer of ours, the Secret copies it once, and the buffer
    is wiped, like every smaller one abandoned when the value did not fit."""
    size = _ENV_BUFFER
    while True:
        buf = bytearray(size)
        try:
            rc = _lib().shim_getenv(sp, _text(name), _ffi().from_buffer(buf), size)
            if rc == _lib().ESPANK_ENV_NOEXIST:
                return None
            if rc == _lib().ESPANK_NOSPACE and size < _ENV_BUFFER_MAX:
                size *= 4
                continue
            _check(rc, f"spank_getenv({name})")
            end = buf.find(0)
            return Secret(bytearray(memoryview(buf)[:end if end >= 0 else size]))
        finally:
            wipe(buf)


def setenv(sp, name: str, value: str, overwrite: bool = True) -> None:
    """Set a variable in the job's environment (before fork: all tasks; in a task: that task)."""
    _check(_lib().shim_setenv(sp, _text(name), _text(value), int(overwrite)), f"spank_setenv({name})")


def unsetenv(sp, name: str) -> None:
    _check(_lib().shim_unsetenv(sp, _text(name)), f"spank_unsetenv({name})")


def job_control_setenv(sp, name: str, value: str) -> None:
    """Set a variable in the job-control environment (srun/sbatch). Never for secrets: it is
    stored by slurmctld and handed to every prolog and epilog."""
    _check(_lib().shim_job_control_setenv(sp, _text(name), _text(value), 1),
           f"spank_job_control_setenv({name})")


# ------------------------------------------------------------------ output

# Every message is made printable on its way out: paths and names in it come from users and images.

def log(level: str, message: str) -> None:
    """A line in the Slurm log of this process (slurmd's log on nodes), prefixed 'sif-image: '.
    In a task, and in slurmstepd once the step's I/O is set up, Slurm copies it to the job's
    stderr too (errors always, the rest with srun --slurmd-debug): never log what the user must
    not see with it; that is ``log_private``."""
    _lib().log_line(LOG_LEVELS[level], _text(printable(message)))


def log_private(message: str) -> None:
    """A line for the admin alone (a bug's traceback): slurmd's log, never the job's stderr; the
    system log in srun, sbatch and salloc."""
    _lib().log_private(_text(printable(message)))


def tell_user(message: str) -> None:
    """One line on the user's stderr (srun's or the batch job's), prefixed 'sif-image: '."""
    _lib().user_line(_text(printable(message)))


# ------------------------------------------------------------------ container mode

# The shim's option indexes (enum in csrc/shim.c), by option name.
OPTION_INDEX = {"sif-image": 0, "sif-container": 1, "sif-binds": 2, "sif-workdir": 3}


def option_value_of(name: str) -> str | None:
    """The value the C option callback recorded for option ``name`` (None if not given; a flag
    without value that was given is "")."""
    value = _lib().shim_option_value_of(OPTION_INDEX[name])
    return None if value == _ffi().NULL else _ffi().string(value).decode("utf-8", "surrogateescape")


def option_conflict_of(name: str) -> bool:
    """True when Slurm handed the remote callback of option ``name`` two different values."""
    return bool(_lib().shim_option_conflict_of(OPTION_INDEX[name]))


def set_container_active(on: bool) -> None:
    """Tell the shim whether this step's tasks enter the image (it then calls task_init)."""
    _lib().shim_set_container_active(int(on))


def job_environment(sp) -> dict[str, str]:
    """The whole job environment (in a task callback: that task's), as Slurm holds it."""
    env = _lib().shim_job_env(sp)
    if env == _ffi().NULL:
        raise SpankCallError("spank_get_item(S_JOB_ENV) failed")
    result: dict[str, str] = {}
    i = 0
    while env[i] != _ffi().NULL:
        name, _, value = _ffi().string(env[i]).decode("utf-8", "surrogateescape").partition("=")
        result.setdefault(name, value)  # the first one wins, as getenv() sees it
        i += 1
    return result


def job_control_unsetenv(sp, name: str) -> None:
    """Remove a variable from the job-control environment (srun/sbatch/salloc)."""
    rc = _lib().shim_job_control_unsetenv(sp, _text(name))
    if rc != _lib().ESPANK_ENV_NOEXIST:
        _check(rc, f"spank_job_control_unsetenv({name})")
