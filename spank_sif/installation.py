"""Where this installation's SPANK plugin is, which Python it runs, and the plugstack.conf line
that loads it (``spank-sif plugstack-line`` prints it, ``spank-sif doctor`` looks for it)."""
import importlib.machinery
import os

from spank_sif.errors import SystemSetupError


def plugin_path() -> str:
    """The compiled plugin inside the installed package (the file name carries Python's ABI tag)."""
    package = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = os.path.join(package, "_plugin" + suffix)
        if os.path.isfile(candidate):
            return os.path.realpath(candidate)
    raise SystemSetupError(f"the SPANK plugin is not built in {package}: install spank-sif with "
                           f"pip (it compiles csrc/shim.c; needs libslurm-dev and python3-dev)")


def plugin_python() -> str:
    """The interpreter the plugin was built for (baked into it at build time)."""
    plugin_path()
    import spank_sif._plugin as compiled
    return compiled.ffi.string(compiled.lib.shim_python()).decode()


def plugstack_line(config=None, state_dir=None, optional=False) -> str:
    words = ["optional" if optional else "required", plugin_path(), "python=" + plugin_python()]
    for key, value in (("config", config), ("state_dir", state_dir)):
        if value:
            if not os.path.isabs(value) or any(c.isspace() for c in value):
                raise SystemSetupError(f"--{key.replace('_', '-')} must be an absolute path "
                                       f"without spaces (plugstack.conf has no quoting)")
            words.append(f"{key}={value}")
    return " ".join(words)
