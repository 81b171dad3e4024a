"""The options and their environment defaults: ``--sif-image=PATH`` (``SLURM_SIF_IMAGE``), and for
container mode ``--sif-container`` (``SLURM_SIF_CONTAINER``), ``--sif-binds=SRC[:DST[:ro]],...``
(``SLURM_SIF_BINDS``) and ``--sif-workdir=PATH`` (``SLURM_SIF_WORKDIR``).

The C shim registers the option (so ``--help`` and option parsing never start Python) and records
the value Slurm hands its callback, last one winning: the environment first, then the command line.
This module decides what that value means.

- On the submit side (srun, sbatch, salloc) the path is checked for syntax only (the image may not
  exist on the login node) and made absolute against the user's working directory. The absolute
  path is exported as ``SLURM_SIF_IMAGE`` into the command's environment, which Slurm copies into
  the job: the tasks can see which image they run, and nested sruns of a batch script inherit it
  as their default unless they give their own ``--sif-image``.
- On a node the image is the option's value when it is absolute, else the job's ``SLURM_SIF_IMAGE``
  (the absolute form the submit side exported).
- ``--sif-image=`` (empty) switches an inherited default off.

The container options travel the same way, through their environment variables: the submit side
exports the value it was given (bind sources made absolute), so that a step on a node, and every
srun of a batch job, finds it in the job's environment. sbatch and salloc do not pass them on as
options (Slurm would make every srun of the job see them as given on its own command line, and a
step that switches its image off could not switch them off); the variables serve as defaults
there, which a nested srun may override (``SLURM_SIF_CONTAINER=0``, ``--sif-binds=``).
"""
import os

from spank_sif.errors import UsageError

OPTION = "sif-image"
ENV_DEFAULT = "SLURM_SIF_IMAGE"
# Slurm's name for the option in the job-control environment: _SLURM_SPANK_OPTION_<plugin>_<option>
# with every non-alphanumeric character replaced by '_' (plugin "sif").
OPTION_ENV = "_SLURM_SPANK_OPTION_sif_sif_image"
PATH_MAX = 4096


def check_syntax(path: str) -> str:
    """Refuse values that cannot be a file name; returns the path unchanged."""
    if "\0" in path or "\n" in path:
        raise UsageError(f"--{OPTION}: the path contains a NUL or newline character")
    if len(path.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise UsageError(f"--{OPTION}: the path is longer than {PATH_MAX - 1} bytes")
    if path.endswith("/"):
        raise UsageError(f"--{OPTION}={path}: names a directory; give the path of a .sif file")
    return path


def submit_side_image(option_value: str | None, environ, cwd: str) -> str | None:
    """The absolute image path for srun/sbatch/salloc, or None when no image is wanted."""
    value = option_value if option_value is not None else environ.get(ENV_DEFAULT)
    if not value:
        return None
    check_syntax(value)
    return os.path.normpath(os.path.join(cwd, value))


def node_side_image(option_value: str | None, job_env_value: str | None,
                    conflict: bool = False) -> str | None:
    """The absolute image path for a step on a node, or None when the step uses no image."""
    if conflict:
        raise UsageError(f"--{OPTION} reached this node with two different values; give it once")
    if option_value == "":
        return None
    if option_value and os.path.isabs(option_value):
        path = option_value
    elif job_env_value:
        path = job_env_value
    elif option_value:
        raise UsageError(f"--{OPTION}={option_value}: relative path and no {ENV_DEFAULT} in the "
                         f"job environment to resolve it (was the job submitted with "
                         f"--export=NONE?); give an absolute path")
    else:
        return None
    check_syntax(path)
    if not os.path.isabs(path):
        raise UsageError(f"{ENV_DEFAULT}={path}: must be an absolute path on the nodes")
    return os.path.normpath(path)


# ------------------------------------------------------------------ container mode

CONTAINER_OPTION, CONTAINER_ENV = "sif-container", "SLURM_SIF_CONTAINER"
BINDS_OPTION, BINDS_ENV = "sif-binds", "SLURM_SIF_BINDS"
WORKDIR_OPTION, WORKDIR_ENV = "sif-workdir", "SLURM_SIF_WORKDIR"
CONTAINER_OPTIONS = (CONTAINER_OPTION, BINDS_OPTION, WORKDIR_OPTION)
ON, OFF = ("1", "yes", "true"), ("0", "no", "false", "")
# Bind specifications name the site's two per-user binds with these words.
HOME, WORKDIR = "~", "."


def option_env(option: str) -> str:
    """Slurm's job-control name of an option of this plugin (see OPTION_ENV)."""
    return "_SLURM_SPANK_OPTION_sif_" + "".join(c if c.isalnum() else "_" for c in option)


def container_flag(value: str | None, where: str = CONTAINER_ENV) -> bool | None:
    """``SLURM_SIF_CONTAINER``'s meaning: True, False, or None when unset (the site decides)."""
    if value is None:
        return None
    word = value.strip().lower()
    if word in ON:
        return True
    if word in OFF:
        return False
    raise UsageError(f"{where}={value!r}: must be 1 (run the tasks inside the image) or 0")


class BindSpec(tuple):
    """One bind: a host path, where it appears inside the container, and whether it is read-only.
    ``source`` may be HOME or WORKDIR in the site's list. (A tuple by hand, not a NamedTuple: srun
    imports this module, and importing typing would cost every srun with an image.)"""

    __slots__ = ()

    def __new__(cls, source: str, target: str, readonly: bool = False):
        return tuple.__new__(cls, (source, target, readonly))

    source = property(lambda self: self[0])
    target = property(lambda self: self[1])
    readonly = property(lambda self: self[2])

    def __repr__(self) -> str:
        return f"BindSpec({self.source!r}, {self.target!r}, readonly={self.readonly})"

    def __str__(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.readonly else "")


def _check_path(path: str, what: str) -> str:
    if "\0" in path or "\n" in path:
        raise UsageError(f"{what}: the path contains a NUL or newline character")
    if len(path.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise UsageError(f"{what}: the path is longer than {PATH_MAX - 1} bytes")
    return path


def parse_bind(entry: str, where: str = f"--{BINDS_OPTION}", cwd: str | None = None,
               specials: bool = False) -> BindSpec:
    """``SRC[:DST[:ro|rw]]`` (or ``SRC:ro``). A relative SRC is made absolute against ``cwd``
    (refused without one); DST must be absolute and defaults to SRC. With ``specials``, SRC may be
    HOME or WORKDIR (alone: they bind at the same path)."""
    parts = entry.split(":")
    if len(parts) == 2 and parts[1] in ("ro", "rw"):
        parts = [parts[0], "", parts[1]]
    if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")) or not parts[0]:
        raise UsageError(f"{where}: {entry!r} is not SRC[:DST[:ro]] (paths may not contain ':' or ',')")
    source, target = parts[0], parts[1] if len(parts) > 1 else ""
    readonly = len(parts) == 3 and parts[2] == "ro"
    _check_path(source, where)
    if specials and source in (HOME, WORKDIR):
        if target:
            raise UsageError(f"{where}: {entry!r}: {source} binds at its own path; give no DST")
        return BindSpec(source, source, readonly)
    if not os.path.isabs(source):
        if cwd is None:
            raise UsageError(f"{where}: {entry!r}: the source must be an absolute path")
        source = os.path.join(cwd, source)
    source = os.path.normpath(source)
    target = _check_path(target, where) or source
    if not os.path.isabs(target):
        raise UsageError(f"{where}: {entry!r}: the destination inside the container must be absolute")
    target = os.path.normpath(target)
    if target == "/":
        raise UsageError(f"{where}: {entry!r}: cannot bind over the container's root")
    return BindSpec(source, target, readonly)


def parse_binds(text: str, where: str = f"--{BINDS_OPTION}", cwd: str | None = None) -> list[BindSpec]:
    """A comma-separated list of bind specifications (empty entries ignored)."""
    return [parse_bind(entry, where, cwd) for entry in text.split(",") if entry]


def format_binds(binds: list[BindSpec]) -> str:
    return ",".join(str(b) for b in binds)


def check_workdir(path: str, where: str = f"--{WORKDIR_OPTION}") -> str:
    """A working directory inside the container: absolute (the container has no submit side)."""
    _check_path(path, where)
    if path and not os.path.isabs(path):
        raise UsageError(f"{where}={path}: give an absolute path inside the container")
    return os.path.normpath(path) if path else ""


def submit_side_container(option: dict[str, str | None], environ, cwd: str) -> dict[str, str]:
    """The environment defaults srun/sbatch/salloc export for the container options given on their
    command line (``option``: name -> value or None): checked, bind sources made absolute."""
    exports = {}
    if option.get(CONTAINER_OPTION) is not None:
        exports[CONTAINER_ENV] = "1"
    binds = option.get(BINDS_OPTION)
    if binds is None and environ.get(BINDS_ENV):
        binds = environ[BINDS_ENV]  # a default: made absolute here as well, where cwd is known
    if binds is not None:
        exports[BINDS_ENV] = format_binds(parse_binds(binds, cwd=cwd))
    workdir = option.get(WORKDIR_OPTION)
    if workdir is not None:
        exports[WORKDIR_ENV] = check_workdir(workdir)
    return exports


def node_side_value(option_value: str | None, job_env_value: str | None, name: str,
                    conflict: bool = False) -> str | None:
    """A container option's value on a node: the submit side's export in the job environment
    (absolute), else what the option itself carried (--export=NONE), else None."""
    if conflict:
        raise UsageError(f"--{name} reached this node with two different values; give it once")
    return job_env_value if job_env_value is not None else option_value


def node_side_container(option_given: bool, job_env_value: str | None, site_default: bool) -> bool:
    """Whether a step's tasks run inside the image: the option, else SLURM_SIF_CONTAINER, else the
    site's ``container_default``."""
    if option_given:
        return True
    flag = container_flag(job_env_value)
    return site_default if flag is None else flag
