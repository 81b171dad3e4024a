"""``spank-sif plugin-path`` and ``spank-sif plugstack-line``: where the installed plugin is and the
line an admin puts in ``/etc/slurm/plugstack.conf.d/spank-sif.conf``."""
from spank_sif.installation import plugin_path, plugstack_line


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


def run_path(args) -> int:
    print(plugin_path())
    return 0


def run_line(args) -> int:
    print(plugstack_line(args.config, args.state_dir, args.optional))
    return 0
