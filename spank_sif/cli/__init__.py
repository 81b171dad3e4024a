"""The ``spank-sif`` command.

Each module of this package adds its sub-commands with ``register(subparsers)``; a handler takes the
parsed arguments and returns the exit code. Every ``SifError`` ends as one line on stderr
(``spank-sif: <message>``) and its ``exit_code``; a bug is one line too (exit 1), its traceback
shown only with ``SPANK_SIF_TRACEBACK=1``.
Paths and names come from users and images: commands quote them through ``printable``, and while a
command runs its standard output and error pass any character that would drive a terminal (an
escape sequence, a carriage return, a bidirectional override) as an escape, whatever printed it.
"""
import argparse
import importlib
import os
import sys

from spank_sif import __version__
from spank_sif.errors import SifError, printable

TRACEBACK_VARIABLE = "SPANK_SIF_TRACEBACK"  # set: a bug shows its traceback instead of one line

# Sub-command -> the module of this package that defines it, in --help order. A command line that
# names its command imports only that module: start-up is part of every command's cost.
COMMANDS = {
    "inspect": "inspect",
    "verify-key": "keys", "keygen": "keys", "encrypt": "encrypt",
    "open": "node", "close": "node", "list": "node", "epilog": "node", "cleanup": "node",
    "plugin-path": "plugin", "plugstack-line": "plugin",
    "doctor": "doctor",
    "demo": "demo",
}

EXIT_CODES = """exit codes:
  0   success
  1   internal error (a bug: please report it; SPANK_SIF_TRACEBACK=1 shows where)
  2   wrong key: no keyslot of the image accepts the key
  3   unusable image (not SIF, malformed, truncated, unsupported format)
  4   unusable key material (no key, bad or encrypted PEM, unreadable key file)
  5   refused by site policy (image location, KDF cost above the cap, ...)
  6   invalid site configuration
  7   node cannot do it (no dm-crypt/loop in the kernel, no free loop device, mount failed)
  8   state directory problem
  64  usage error
"""


class _TerminalSafe:
    """A command's sys.stdout or sys.stderr: each line written is made printable, line ends pass.
    The guard behind the commands' own escaping, so no print can reach a terminal raw."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write("\n".join(printable(line) for line in text.split("\n")))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default exits 2, which means "wrong key" here
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {printable(message)}", file=sys.stderr)
        sys.exit(64)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every command, or only for ``command`` when given (faster to build)."""
    parser = _Parser(prog="spank-sif", description="Encrypted SIF images for Slurm jobs.",
                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spank-sif {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    modules = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(f"spank_sif.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _TerminalSafe(sys.stdout), _TerminalSafe(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = saved


def _main(argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
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
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(printable(f"spank-sif: internal error ({type(exc).__name__}: {exc}); this is a bug, please "
                        f"report it with what {TRACEBACK_VARIABLE}=1 shows"), file=sys.stderr)
        return 1
