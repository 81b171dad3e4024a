"""The ``--sif-image=PATH`` option and its environment default ``SLURM_SIF_IMAGE``.

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
