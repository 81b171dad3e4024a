"""The site's rules for an opened image, applied where the image is opened: on the node before
anything is unlocked (lifecycle), and on the submit host before a job is queued (submit). One
owner, so both say the same thing in the same words.

Each rule is judged on the descriptor the user's open returned, never on a path.
"""
import os

from spank_sif import keys, sif
from spank_sif.errors import ImageError, KeyMaterialError, PolicyError


def check_location(fd: int, image_path: str, config) -> str:
    """Where the opened file really is (symlinks resolved by the kernel), checked against the site's
    allowed directories."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:  # ENAMETOOLONG: a real path longer than the kernel's limit (PATH_MAX)
        raise ImageError(f"image {image_path}: its full path is too long for this system "
                         f"({exc.strerror}): move it to a shorter path") from exc
    allowed = config.allowed_image_paths
    if allowed and not any(os.path.commonpath([real, d]) == d for d in allowed):
        raise PolicyError(f"image {image_path} ({real}) is outside the directories this site allows "
                          f"for images ({', '.join(allowed)}): copy it there or ask your admin")
    return real


def check_encryption(part, image_path: str, config) -> bool:
    """True if the image is encrypted (LUKS2), False if plain and allowed; refuses the rest.
    (sif.primary_partition already refused gocryptfs and non-squashfs partitions.)"""
    encrypted = part.fs_type == sif.FsType.ENCRYPTED_SQUASHFS
    if not encrypted and not config.allow_unencrypted:
        raise PolicyError(f"image {image_path} is not encrypted and this site only runs encrypted "
                          "images (allow_unencrypted: false)")
    return encrypted


def check_kernel_mount(fd: int, encrypted: bool, image_path: str, config) -> None:
    """The site's ``kernel_mount`` policy: may the kernel's squashfs driver parse this file as root?
    Decided on the opened file, before any key work (docs/security-model.md says why)."""
    policy = config.kernel_mount
    if policy == "always" or (policy == "encrypted-only" and encrypted):
        return
    from spank_sif.userfiles import who_else_can_write
    writer = who_else_can_write(fd)
    if not writer:
        return
    if policy == "encrypted-only":
        raise PolicyError(f"image {image_path} is not encrypted and can be changed by {writer}; this site "
                          "mounts plain images only when nobody but root can change them (kernel_mount: "
                          "encrypted-only): use an encrypted image, or ask your admin to install this one")
    raise PolicyError(f"image {image_path} can be changed by {writer}; this site mounts only images "
                      f"nobody but root can change (kernel_mount: {policy}): ask your admin to install it")


def key_source(env, config) -> keys.KeySource:
    """The key an encrypted image is opened with: the first of the site's key variables set in
    ``env`` (the job's environment), or the error saying which to set."""
    source = keys.find_key_source(env, list(config.key_variables))
    if source is None:
        names = " or ".join(dict.fromkeys(
            v for v in config.key_variables if v.endswith(("_PASSPHRASE", "_PEM_PATH")))) or "a key variable"
        raise KeyMaterialError(f"the image is encrypted but no key was given: set {names} in the job's "
                               "environment")
    return source
