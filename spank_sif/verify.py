"""Will the node open this image with this key? Answered in userspace, as the user, without root,
dm-crypt or any lock: ``spank-sif verify-key`` asks it, and so do srun, sbatch and salloc before a
job is queued (``submit``).

It takes the node's own path: the header snapshot libcryptsetup loads (``libcryptsetup.Header``)
under the site's KDF caps, the same key variables and PEM unwrap, the same keyslots in the same
order; then one decrypted sector says whether the data is a squashfs, as the node's mount needs.
"""
from spank_sif import keys, libcryptsetup, luks2
from spank_sif.errors import ImageError, WrongKeyError

SQUASHFS_MAGIC = b"hsqs"


def open_header(image, fd: int, part, config) -> libcryptsetup.Header:
    """The encrypted partition's header as libcryptsetup loads it, held against the site's KDF
    caps (PolicyError if no keyslot fits them); errors name the image and the partition."""
    try:
        return libcryptsetup.Header(fd, part.offset, part.size, luks2.site_caps(config))
    except ImageError as err:  # say where: the LUKS2 layer does not know the image
        raise type(err)(f"{image.name}: encrypted partition (id {part.id}): {err}") from err


def check_key(image, fd: int, header: libcryptsetup.Header, source: keys.KeySource) -> int:
    """The keyslot ``source``'s key opens; WrongKeyError with a hint about the likely mistake.
    Key files are read by this process: call it as the user, never as root."""
    with keys.luks_passphrase(image, fd, source, _read_own_file) as passphrase:
        try:
            keyslot, volume_key = header.unlock(passphrase)
        except WrongKeyError as err:
            raise WrongKeyError(f"{err} ({source.describe()}){_hint(image, source, passphrase)}") from err
    volume = header.volume
    with volume_key:
        # One sector more says whether the node's mount would work: the data must be a squashfs.
        first = luks2.decrypt_sectors(volume, fd, volume_key, 0, 1) if volume.segment.sectors else b""
    if first[:4] != SQUASHFS_MAGIC:
        raise ImageError(f"{image.name}: the key opens keyslot {keyslot}, but the decrypted partition is "
                         "not a squashfs file system: the image is corrupt")
    return keyslot


def _hint(image, source: keys.KeySource, passphrase) -> str:
    if source.kind != "passphrase":
        return ""
    if any(m.is_pem_rsa_oaep for m in image.crypto_messages(image.primary_partition())):
        return "; this image was encrypted for a PEM key: use APPTAINER_ENCRYPTION_PEM_PATH or --pem-path"
    if passphrase.value.endswith(b"\n"):
        return "; note the passphrase ends with a newline, which is part of it"
    return ""


def _read_own_file(path: str) -> bytes:
    return keys.read_key_file(path, keys.MAX_PEM_FILE + 1, "key file")
