"""The submit check: srun, sbatch and salloc refuse, before anything is queued, a job whose image
the nodes would refuse, so that a wrong key or a missing image costs seconds, not a wait in the
queue.

It runs in the command's own process (SPANK's local and allocator contexts), which is the user's:
every file is opened with the user's own rights, nothing is elevated. It asks what the node asks, in
the node's words: the image opened (``userfiles.open_as_self``), the site's rules
(``policy``), the SIF and its primary partition (``sif``), and for an encrypted image the header
under the site's KDF caps, the key from the same variables in the same order, and the key derivation
itself (``verify``, the path verify-key takes). The site chooses how much (``submit_check``):

- ``full``: all of it; the key derivation costs what it costs on a node (seconds, memory).
- ``fast``: all but using the key: that one is present is checked, not that it opens the image.
- ``off``: nothing (login nodes that cannot see the images).

An srun inside an allocation (a job step) is checked ``fast`` at most: the allocation was checked
when it was made, and a full check would delay every step by a key derivation.

An image whose directory does not exist on this host is not checked: login nodes do not always
mount what compute nodes mount. The user is told so, in one line, and the job queues.
"""
import os

from spank_sif import policy, sif, userfiles


def mode_for(site_mode: str, context: str, environ) -> str:
    """How much to check here: the site's choice, at most ``fast`` for an srun inside a job."""
    if site_mode == "full" and context == "local" and environ.get("SLURM_JOB_ID"):
        return "fast"
    return site_mode


def check(image_path: str, environ, config, mode: str) -> str | None:
    """Raise the node's SifError for an image (or key) the nodes would refuse. Returns the line to
    tell the user when the image could not be checked from here, else None."""
    if mode == "off":
        return None
    if os.geteuid() != os.getuid():
        # Privileges the user lacks would let this process read what the job's user cannot.
        return f"image {image_path} was not checked at submit (this command runs set-uid)"
    parent = os.path.dirname(image_path)
    try:
        os.stat(parent)
    except FileNotFoundError:
        return (f"image {image_path}: {parent} does not exist on this host, so the image was not "
                "checked at submit; the nodes check it when the job starts")
    except OSError:
        pass  # the open below says what the user cannot do
    fd = userfiles.open_as_self(image_path)
    try:
        policy.check_location(fd, image_path, config)
        image = sif.read_sif(fd, name=image_path)
        part = image.primary_partition()
        encrypted = policy.check_encryption(part, image_path, config)
        policy.check_kernel_mount(fd, encrypted, image_path, config)
        if encrypted:
            _check_key(image, fd, part, environ, config, derive=mode == "full")
    finally:
        os.close(fd)
    return None


def _check_key(image, fd: int, part, environ, config, derive: bool) -> None:
    from spank_sif import verify
    from spank_sif.secret import Undumpable
    with verify.open_header(image, fd, part, config) as header:
        source = policy.key_source(environ, config)
        try:
            if derive:
                with Undumpable():  # no core dump of srun while it holds the key
                    verify.check_key(image, fd, header, source)
        finally:
            if source.secret is not None:
                source.secret.wipe()

