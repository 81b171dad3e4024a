"""What several ``spank-sif`` commands share: the ``--config`` option, plain-text tables, and
``printable`` for anything a command prints that a user or an image chose (paths, names)."""
import os

from spank_sif.errors import printable

CONFIG_HELP = "site configuration (default $SPANK_SIF_CONFIG, else /etc/slurm/spank_sif.yaml)"


def add_config_option(parser) -> None:
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)


def site_config(args):
    """The site configuration a command works under: ``--config``, else ``$SPANK_SIF_CONFIG``,
    else the default path (which may be absent: then every default applies)."""
    from spank_sif.config import CONFIG_VARIABLE, load_config
    return load_config(getattr(args, "config", None) or os.environ.get(CONFIG_VARIABLE) or None)


def table(rows) -> list[str]:
    """Rows of cells (the first one the heading) as left-aligned columns two spaces apart, each
    cell made printable (names and paths in tables come from users and images)."""
    rows = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def read_key_file(path: str, limit: int, what: str) -> bytes:
    """A key file named on the command line, read as the invoking user (``keys.read_key_file``;
    imported here, not at the top: most commands read no key)."""
    from spank_sif.keys import read_key_file as read
    return read(path, limit, what)
