"""Typed errors of spank-sif, and ``printable``: what every message leaving the program goes through.

Every failure a user or an admin can cause is one of these. The message is a single line
meant for people: it names the cause and, where there is one, what to do. It never contains a
secret. ``exit_code`` is what the CLI exits with; the SPANK plugin prefixes the message with
``sif-image:`` and prints it on the user's srun stderr.

Messages quote paths, variable values and strings read from images, all of which a user chooses:
a newline in one would forge a second log line, an escape sequence would drive the reader's
terminal. So a message is made printable once, here, when the error is built, and the places where
text leaves the program (``spank.log``/``spank.tell_user``, the CLI's output) apply the same
function to everything else: no message has to remember to escape what it quotes.
"""


def printable(text: str) -> str:
    """``text`` with every character a terminal or a log would act on shown as an escape.

    Control characters (newlines included), format characters (bidirectional overrides) and
    separators become ``\\xNN``/``\\uNNNN``; bytes that were not UTF-8 (kept by the
    ``surrogateescape`` decoding of paths) show as the byte, ``\\xNN``. Idempotent: its output is
    all printable, so escaping twice changes nothing (a backslash is left as it is)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class SifError(Exception):
    """Base class. ``str(err)`` is the one-line message."""

    exit_code = 1

    def __init__(self, message: str):
        # One printable line whatever the caller passed or quoted (see printable).
        super().__init__(printable(str(message).strip()))


class UsageError(SifError):
    """Bad command line or missing argument."""

    exit_code = 64


class WrongKeyError(SifError):
    """A key was found and is well-formed, but no keyslot of the image accepts it."""

    exit_code = 2


class ImageError(SifError):
    """The file is not a usable SIF image: unreadable, not SIF, malformed or truncated."""

    exit_code = 3


class UnsupportedImageError(ImageError):
    """A valid SIF that spank-sif cannot run (gocryptfs, no primary partition, unknown cipher...)."""

    exit_code = 3


class KeyMaterialError(SifError):
    """No key, or a key that cannot be used (bad PEM, encrypted PEM, OpenSSH key, unreadable file)."""

    exit_code = 4


class PolicyError(SifError):
    """The site configuration forbids this (image outside allowed paths, KDF above the cap...)."""

    exit_code = 5


class ConfigError(SifError):
    """The site configuration file is missing, unreadable or invalid."""

    exit_code = 6


class SystemSetupError(SifError):
    """The node cannot do it: no dm-crypt in the kernel, no free loop device, mount failed..."""

    exit_code = 7


class StateError(SifError):
    """The state directory or a record in it is unusable."""

    exit_code = 8
