"""The site configuration: one YAML file, a fixed schema, defaults for everything.

Admins write it once per cluster (default ``/etc/slurm/spank_sif.yaml``; the plugin takes another
path from a ``config=`` argument in plugstack.conf, the CLI from ``--config`` or ``$SPANK_SIF_CONFIG``).
A missing file at the *default* path means "all defaults"; a file named explicitly must exist.
Unknown keys and wrong types are errors naming the file and the key: a typo must never silently
weaken a security setting.
"""
import os
from typing import NamedTuple

from spank_sif.errors import ConfigError, UsageError
from spank_sif.keys import DEFAULT_KEY_VARIABLES, KINDS as KEY_VARIABLE_KINDS, kind_of
from spank_sif.log import LEVELS as LOG_LEVELS
from spank_sif.options import parse_bind

# What every container gets from the host unless the site says otherwise: the kernel's views, the
# devices (a bind, so GPUs and interconnects work), the scratch directories, the user's home ("~")
# and submit directory ("."), and what Slurm's own tools and MPI need inside (configuration,
# munge's socket, slurmd's spool with the step sockets; a path missing on a node is skipped).
DEFAULT_CONTAINER_BINDS = ("/proc", "/sys", "/dev", "/tmp", "/var/tmp", "~", ".", "/etc/slurm:ro",
                           "/run/munge", "/var/spool/slurmd", "/var/lib/slurm/slurmd")
_DEFAULT_BINDS = tuple(parse_bind(entry, specials=True) for entry in DEFAULT_CONTAINER_BINDS)

DEFAULT_PATH = "/etc/slurm/spank_sif.yaml"
CONFIG_VARIABLE = "SPANK_SIF_CONFIG"  # the CLI's way to name another file
# Which images the kernel may mount (its squashfs driver parses them as root), by who can change
# the file: see docs/security-model.md. A file "only root can change" is judged on the opened
# descriptor (userfiles.who_else_can_write).
KERNEL_MOUNT = ("always", "encrypted-only", "root-owned")
# submit.py says what each checks. A bare "off" is YAML's false: it means off here.
SUBMIT_CHECK = ("full", "fast", "off")


class SiteConfig(NamedTuple):
    """Every setting, with its default. Field comments are the admin documentation."""

    # Where each task sees the image's root filesystem (created, root-owned, if missing).
    mount_point: str = "/sif"
    # Environment variables holding the user's key, in order of precedence.
    key_variables: tuple = DEFAULT_KEY_VARIABLES
    # Remove the key variables from the tasks' environment (keep true unless tasks need them).
    strip_key_variables: bool = True
    # Absolute directories an image must live under ([] = anywhere the user can read).
    allowed_image_paths: tuple = ()
    # Accept unencrypted (plain squashfs) images.
    allow_unencrypted: bool = True
    # Which images the kernel may mount: always (any the user can read), encrypted-only (encrypted
    # images; plain ones only if nobody but root can change them), root-owned (only images nobody
    # but root can change).
    kernel_mount: str = "encrypted-only"
    # Refuse keyslots whose KDF needs more memory than this (KiB), before running the KDF.
    kdf_max_memory_kib: int = 1048576
    # Refuse Argon2 keyslots with more passes (time cost) than this, before running the KDF.
    kdf_max_time_cost: int = 16
    # Refuse Argon2 keyslots with more threads (parallel cost) than this, before running the KDF.
    kdf_max_threads: int = 8
    # Refuse PBKDF2 keyslots, and volume-key digests, with more iterations than this.
    kdf_max_pbkdf2_iterations: int = 32000000
    # How many memory-hard KDFs may run at once on a node.
    kdf_max_parallel: int = 1
    # Seconds a step waits for a free KDF slot on its node before it fails with a message.
    kdf_lock_timeout: int = 300
    # Later steps of a job reuse the mapping an earlier step of the same job made on the node for
    # the same user, image file and key (one key derivation per job per node); false: every step
    # unlocks afresh.
    reuse_mappings: bool = True
    # Root-only directory for the records that let an epilog clean up after a crash.
    state_dir: str = "/run/spank-sif"
    # How much the plugin logs to slurmd's log: error, info, verbose or debug.
    log_level: str = "info"
    # What srun, sbatch and salloc check before a job is queued: full (the image, the site's rules
    # and that the key opens it: one key derivation on the submit host), fast (all but the key
    # derivation) or off (login nodes that cannot see the images).
    submit_check: str = "full"
    # Container mode (--sif-container) for jobs that do not choose (SLURM_SIF_CONTAINER unset).
    container_default: bool = False
    # Host paths bound into every container, SRC[:DST[:ro]]; "~" is the user's home, "." the submit
    # directory. A source missing on a node is skipped.
    container_binds: tuple = _DEFAULT_BINDS
    # Absolute directories the sources of users' --sif-binds must be under ([] = anywhere they can read).
    allowed_bind_paths: tuple = ()
    # Job variables that never enter a container: the image's values (or none) are used instead.
    host_only_variables: tuple = ("PATH", "LD_LIBRARY_PATH", "LD_PRELOAD")
    # Seconds the image's environment scripts (/.singularity.d/env/*.sh) may take in each task.
    container_env_timeout: int = 10
    # Where the settings came from (for messages); not a setting.
    source: str = "(defaults)"

    def setting(self, key: str) -> str:
        """Where an admin changes ``key``, for messages: ``'key' in <file>``."""
        return f"'{key}' in {DEFAULT_PATH if self.source == '(defaults)' else self.source}"


def _check_absolute(path: str, key: str, where: str) -> str:
    if not os.path.isabs(path) or "\0" in path:
        raise ConfigError(f"{where}: '{key}' must be an absolute path, got {path!r}")
    return os.path.normpath(path)


def _expect(value, kind, key: str, where: str, what: str):
    # bool is a subclass of int: "kdf_max_memory_kib: yes" must not pass as 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be {what}, got {type(value).__name__} {value!r}")
    return value


def _validate(raw: dict, where: str) -> SiteConfig:
    known = set(SiteConfig._fields) - {"source"}
    unknown = sorted(map(str, set(raw) - known))  # YAML keys may be numbers, dates, null...
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known keys: {', '.join(sorted(known))})")
    values = {}
    for key, value in raw.items():
        values[key] = _CHECKS[key](value, key, where)
    return SiteConfig(**values, source=where)


def _mount_point(value, key, where):
    path = _check_absolute(_expect(value, str, key, where, "a string"), key, where)
    if path == "/":
        raise ConfigError(f"{where}: '{key}' cannot be '/'")
    return path


def _key_variables(value, key, where):
    names = _expect(value, list, key, where, "a list of environment variable names")
    if not names:
        raise ConfigError(f"{where}: '{key}' must name at least one variable")
    for name in names:
        _expect(name, str, key, where, "a list of strings")
        if not name.replace("_", "").isalnum() or kind_of(name) is None:
            raise ConfigError(f"{where}: '{key}' entry {name!r} must be a variable name ending in "
                              f"{', '.join(KEY_VARIABLE_KINDS)} (that is how its kind is known)")
    return tuple(names)


def _bool(value, key, where):
    return _expect(value, bool, key, where, "true or false")


def _paths(value, key, where):
    paths = _expect(value, list, key, where, "a list of absolute directories")
    return tuple(_check_absolute(_expect(p, str, key, where, "a list of strings"), key, where) for p in paths)


def _positive(value, key, where):
    if _expect(value, int, key, where, "a whole number") < 1:
        raise ConfigError(f"{where}: '{key}' must be at least 1, got {value}")
    return value


def _one_of(choices):
    def check(value, key, where):
        if _expect(value, str, key, where, "a string") not in choices:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def _binds(value, key, where):
    entries = _expect(value, list, key, where, "a list of SRC[:DST[:ro]] entries")
    try:
        return tuple(parse_bind(_expect(e, str, key, where, "a list of strings"), f"{where}: '{key}'",
                                specials=True) for e in entries)
    except UsageError as err:
        raise ConfigError(str(err)) from err


def _variable_names(value, key, where):
    names = _expect(value, list, key, where, "a list of environment variable names")
    for name in names:
        if not isinstance(name, str) or not name.replace("_", "").isalnum() or name[0].isdigit():
            raise ConfigError(f"{where}: '{key}' entry {name!r} is not an environment variable name")
    return tuple(names)


_CHECKS = {
    "mount_point": _mount_point,
    "key_variables": _key_variables,
    "strip_key_variables": _bool,
    "allowed_image_paths": _paths,
    "allow_unencrypted": _bool,
    "kernel_mount": _one_of(KERNEL_MOUNT),
    "kdf_max_memory_kib": _positive,
    "kdf_max_time_cost": _positive,
    "kdf_max_threads": _positive,
    "kdf_max_pbkdf2_iterations": _positive,
    "kdf_max_parallel": _positive,
    "kdf_lock_timeout": _positive,
    "reuse_mappings": _bool,
    "state_dir": lambda v, k, w: _check_absolute(_expect(v, str, k, w, "a string"), k, w),
    "log_level": _one_of(LOG_LEVELS),
    "submit_check": lambda v, k, w: _one_of(SUBMIT_CHECK)("off" if v is False else v, k, w),
    "container_default": _bool,
    "container_binds": _binds,
    "allowed_bind_paths": _paths,
    "host_only_variables": _variable_names,
    "container_env_timeout": _positive,
}


def _strict_loader(where: str):
    """PyYAML's safe loader, except that a key given twice is an error: YAML lets the last one win,
    so a forgotten earlier line ("allow_unencrypted: false") would be silently overridden."""
    import yaml  # here, not at the top: most commands and nodes have no file to parse

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: PyYAML's own check below says so
                    continue
                if duplicate:
                    raise ConfigError(f"{where}: '{key}' is set twice (line {key_node.start_mark.line + 1}); "
                                      "keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def parse_config(text: str, where: str = "<config>") -> SiteConfig:
    """Validate YAML text; ``where`` names it in messages."""
    loader = _strict_loader(where)
    import yaml
    try:
        raw = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from exc
    except (ValueError, LookupError, TypeError, AttributeError) as exc:
        # PyYAML's constructors of numbers, dates and booleans let Python's own errors through:
        # "!!int x", "2001-02-30", a 5000-digit number (ValueError), "!!int " (IndexError),
        # "!!bool x" (KeyError), "!!timestamp x" (AttributeError).
        detail = f" ({exc})" if isinstance(exc, ValueError) else ""
        raise ConfigError(f"{where}: not valid YAML: a malformed number, date or true/false value{detail}") \
            from exc
    if raw is None:
        return SiteConfig(source=where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping of settings, got {type(raw).__name__}")
    return _validate(raw, where)


def load_config(path: str | None = None) -> SiteConfig:
    """Load the site configuration. ``path=None`` means the default path, which may be absent."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except FileNotFoundError as exc:
        if explicit:
            raise ConfigError(f"{path}: site configuration file not found") from exc
        return SiteConfig()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the site configuration: "
                          f"{getattr(exc, 'strerror', None) or exc}") from exc
    return parse_config(text, path)
