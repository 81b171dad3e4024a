"""``spank-sif plugin-path`` and ``spank-sif plugstack-line``: where the installed plugin is and the
line an admin puts in ``/etc/slurm/plugstack.conf.d/spank-sif.conf``."""
import importlib.machinery
import os

from spank_sif.errors import SystemSetupError


def register(subparsers) -> None:
    p = subparsers.add_parser("plugin-path", help="print the absolute path of the SPANK plugin",
                              description="Print the absolute path of the installed SPANK plugin "
                                          "(the shared object Slurm loads).")
    p.set_defaults(func=run_path)
    p = subparsers.add_parser("plugstack-line", help="print the plugstack.conf line for this install",
                              description="Print the line that loads the plugin, for "
                                          "/etc/slurm/plugstack.conf.d/spank-sif.conf.")
    p.add_argument("--config", metavar="PATH",
                   help="site configuration file (default /etc/slurm/spank_sif.yaml)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="state directory, if the site configuration sets another than /run/spank-sif")
    p.add_argument("--optional", action="store_true",
                   help="'optional' instead of 'required' (jobs run without the plugin if it fails "
                        "to load; not recommended)")
    p.set_defaults(func=run_line)


def plugin_path() -> str:
    """The compiled plugin inside the installed package (the file name carries Python's ABI tag)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def run_path(args) -> int:
    print(plugin_path())
    return 0


def run_line(args) -> int:
    print(plugstack_line(args.config, args.state_dir, args.optional))
    return 0
