"""The ``spank-sif`` command.

Each module of this package adds its sub-commands with ``register(subparsers)``; a handler takes the
parsed arguments and returns the exit code. Every ``SifError`` ends as one line on stderr
(``spank-sif: <message>``) and its ``exit_code``; nothing a user can cause prints a traceback.
"""
import argparse
import importlib
import sys

from spank_sif import __version__
from spank_sif.errors import SifError

# Sub-command modules, in the order their commands appear in --help.
COMMAND_MODULES = ("inspect", "keys", "node", "plugin", "demo")

EXIT_CODES = """exit codes:
  0   success
  1   internal error (a bug: please report it)
  2   wrong key: no keyslot of the image accepts the key
  3   unusable image (not SIF, malformed, truncated, unsupported format)
  4   unusable key material (no key, bad or encrypted PEM, unreadable key file)
  5   refused by site policy (image location, KDF cost above the cap, ...)
  6   invalid site configuration
  7   node cannot do it (no dm-crypt/loop in the kernel, no free loop device, mount failed)
  8   state directory problem
  64  usage error
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default exits 2, which means "wrong key" here
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(64)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spank-sif", description="Encrypted SIF images for Slurm jobs.",
                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spank-sif {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"spank_sif.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 64
    try:
        return int(args.func(args) or 0)
    except SifError as err:
        print(f"spank-sif: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
