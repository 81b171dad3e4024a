"""``spank-sif verify-key`` and ``spank-sif keygen``.

verify-key answers "will the plugin open this image with this key?" without root or dm-crypt, the
same way the plugin gets there: the same key variables, the same PEM unwrap, the same header
snapshot loaded by libcryptsetup, the same KDF caps and keyslots (``libcryptsetup.Header``); then
one decrypted sector says whether the data is a squashfs. keygen makes the RSA pair Apptainer's
``--pem-path`` wants.
"""
import argparse
import os

from spank_sif import keys, libcryptsetup, luks2, sif
from spank_sif.cli.common import add_config_option, printable, read_key_file, site_config
from spank_sif.errors import ImageError, KeyMaterialError, UsageError, WrongKeyError

SQUASHFS_MAGIC = b"hsqs"

VERIFY_EPILOG = """\
The key comes from --passphrase-file or --pem-path, or else from the environment variables the
plugin reads, in the site configuration's order (default: APPTAINER_ENCRYPTION_PEM_PATH,
APPTAINER_ENCRYPTION_PEM_DATA, APPTAINER_ENCRYPTION_PASSPHRASE, then the SINGULARITY_ENCRYPTION_*
twins). A passphrase is used byte for byte, as Apptainer does: a trailing newline in a passphrase
file is part of the passphrase (write it with printf, not echo). The site's KDF caps
(kdf_max_memory_kib, kdf_max_time_cost, kdf_max_threads, kdf_max_pbkdf2_iterations) apply as in
the plugin.

exit codes:
  0   the key opens the image (prints the keyslot), or the image is not encrypted (nothing to unlock)
  2   wrong key: no keyslot accepts it, or the PEM key does not match the image
  3   unusable image (not SIF, malformed, gocryptfs-encrypted, corrupt LUKS2 header, or the
      decrypted partition is not a squashfs)
  4   unusable key (none given, empty, bad/encrypted/OpenSSH PEM, unreadable key file)
  5   the image's key derivation costs more than the site allows (memory, passes, threads,
      PBKDF2 iterations)
  6   invalid site configuration
  64  usage error
"""

KEYGEN_EPILOG = """\
Both files are PKCS#1 PEM ("RSA PRIVATE KEY" / "RSA PUBLIC KEY"), as Apptainer wants them:
build with 'apptainer build --pem-path PUBLIC ...', run with APPTAINER_ENCRYPTION_PEM_PATH=PRIVATE.
The private key is created mode 0600 and neither file may exist already.
exit codes: 0 written, 64 usage error (bad size, file exists or cannot be created).
"""


def register(subparsers) -> None:
    v = subparsers.add_parser(
        "verify-key", help="check that a key opens an encrypted SIF image (no root needed)",
        description="Check that a key opens the LUKS2-encrypted primary partition of a SIF image, "
                    "in userspace (no root, no dm-crypt), and that the partition decrypts to a squashfs.",
        epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("image", metavar="IMAGE", help="SIF image file")
    source = v.add_mutually_exclusive_group()
    source.add_argument("--passphrase-file", metavar="F", help="read the passphrase from F (exact bytes)")
    source.add_argument("--pem-path", metavar="F", help="RSA private key (PEM) for a PEM-encrypted image")
    add_config_option(v)
    v.set_defaults(func=verify_key)

    k = subparsers.add_parser(
        "keygen", help="make an RSA key pair for PEM-encrypted images",
        description="Write a new RSA key pair that Apptainer's --pem-path accepts.",
        epilog=KEYGEN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--private", metavar="F", required=True, help="private key file to create (0600)")
    k.add_argument("--public", metavar="F", required=True, help="public key file to create")
    k.add_argument("--bits", metavar="N", type=int, default=4096, help="modulus size (default 4096)")
    k.set_defaults(func=keygen)


# ---------------------------------------------------------------------------------------------
# verify-key


def verify_key(args) -> int:
    config = site_config(args)
    fd = sif.open_image(args.image)
    try:
        image = sif.read_sif(fd, name=args.image)
        part = image.primary_partition()
        if part.fs_type == sif.FsType.SQUASHFS:
            print(f"{printable(args.image)}: not encrypted (plain squashfs): nothing to unlock, no key needed")
            return 0
        try:
            header = libcryptsetup.Header(fd, part.offset, part.size, luks2.site_caps(config))
        except ImageError as err:  # say where: the LUKS2 layer does not know the image
            raise type(err)(f"{args.image}: encrypted partition (id {part.id}): {err}") from err
        with header:
            source = key_source(args, config.key_variables)
            keyslot = check_key(image, fd, header, source)
    finally:
        os.close(fd)
    print(f"{printable(args.image)}: the key from {printable(source.describe())} opens keyslot {keyslot}")
    return 0


def key_source(args, variables) -> keys.KeySource:
    """The key named on the command line, else the one the plugin would take from the environment."""
    if args.pem_path:
        return keys.KeySource("pem_path", "--pem-path", path=args.pem_path)
    if args.passphrase_file:
        data = read_key_file(args.passphrase_file, keys.MAX_PASSPHRASE, "--passphrase-file")
        return keys.passphrase_from_file(data, args.passphrase_file)
    source = keys.find_key_source(os.environ, variables)
    if source is None:
        raise KeyMaterialError(f"no key: set one of {', '.join(variables)}, "
                               "or use --passphrase-file or --pem-path")
    return source


def check_key(image, fd: int, header: libcryptsetup.Header, source: keys.KeySource) -> int:
    """The keyslot ``source``'s key opens; WrongKeyError with a hint about the likely mistake."""
    with keys.luks_passphrase(image, fd, source, _read_user_file) as passphrase:
        try:
            keyslot, volume_key = header.unlock(passphrase)
        except WrongKeyError as err:
            raise WrongKeyError(f"{err} ({source.describe()}){_hint(image, source, passphrase)}") from err
    volume = header.volume
    with volume_key:
        # One sector more says whether the plugin's mount would work: the data must be a squashfs.
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


def _read_user_file(path: str) -> bytes:
    # The CLI runs as the user: an ordinary open is the user's own access check.
    return read_key_file(path, keys.MAX_PEM_FILE + 1, "key file")


# ---------------------------------------------------------------------------------------------
# keygen


def keygen(args) -> int:
    if not 2048 <= args.bits <= 16384 or args.bits % 8:
        raise UsageError(f"--bits {args.bits}: choose a multiple of 8 from 2048 to 16384 (e.g. 4096)")
    if os.path.abspath(args.private) == os.path.abspath(args.public):
        raise UsageError("--private and --public must be different files")
    for path in (args.private, args.public):
        if os.path.lexists(path):
            raise UsageError(f"{path} already exists; refusing to overwrite a key file")
    private, public = keys.generate_key_pair(args.bits)
    _create(args.private, private, 0o600)
    try:
        _create(args.public, public, 0o644)
    except UsageError:
        os.unlink(args.private)  # we just created it: leave nothing half done
        raise
    print(f"wrote {printable(args.private)} (private, mode 0600) and {printable(args.public)} (public), "
          f"RSA {args.bits} bits")
    return 0


def _create(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte on (O_EXCL: never an existing file or link)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise UsageError(f"{path}: cannot create the key file: {exc.strerror}") from exc
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise UsageError(f"{path}: cannot write the key file: {exc.strerror}") from exc
    os.close(fd)
