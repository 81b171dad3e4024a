"""``spank-sif verify-key`` and ``spank-sif keygen``.

verify-key answers "will the plugin open this image with this key?" without root or dm-crypt, the
same way the plugin gets there (``spank_sif.verify``, which the submit check of srun, sbatch and
salloc shares). keygen makes the RSA pair Apptainer's ``--pem-path`` wants.
"""
import argparse
import os

from spank_sif import keys, sif, verify
from spank_sif.cli.common import add_config_option, printable, read_key_file, site_config
from spank_sif.errors import KeyMaterialError, UsageError

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
        with verify.open_header(image, fd, part, config) as header:
            source = key_source(args, config.key_variables)
            keyslot = verify.check_key(image, fd, header, source)
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
