"""Typed errors of spank-sif.

Every failure a user or an admin can cause is one of these. The message is a single line
meant for people: it names the cause and, where there is one, what to do. It never contains a
secret. ``exit_code`` is what the CLI exits with; the SPANK plugin prefixes the message with
``sif-image:`` and prints it on the user's srun stderr.
"""


class SifError(Exception):
    """Base class. ``str(err)`` is the one-line message."""

    exit_code = 1

    def __init__(self, message: str):
        # Keep messages to one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


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
