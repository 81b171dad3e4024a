"""``spank-sif encrypt IN OUT``: make an encrypted SIF image as an ordinary user (spank_sif.builder)."""
import argparse
import os
import signal
import sys
import time

from spank_sif import builder, keys
from spank_sif.cli.common import add_config_option, read_key_file, site_config
from spank_sif.errors import KeyMaterialError, PolicyError, UsageError
from spank_sif.secret import Secret

PROGRESS_FROM = 256 << 20      # smaller images take a few seconds: no bar
DEFAULT_KDF = builder.Kdf()

DESCRIPTION = """\
Encrypt the root file system of a plain SIF image (or a bare squashfs file) and write it as an
encrypted SIF image laid out as 'apptainer build --encrypt' lays it out (LUKS2, fs type 5), without
root or device-mapper. Apptainer and spank-sif open the result with --passphrase / --pem-path or
the APPTAINER_ENCRYPTION_* variables. Every other object of IN (definition file, labels, JSON) is
kept; signatures are dropped (they would not match the encrypted image: sign OUT again)."""

EPILOG = f"""\
examples:
  spank-sif keygen --private ~/.keys/app.pem --public ~/.keys/app.pub.pem
  spank-sif encrypt app.sif app-enc.sif --pem-path ~/.keys/app.pub.pem
  APPTAINER_ENCRYPTION_PEM_PATH=~/.keys/app.pem srun --sif-image=app-enc.sif ...

  spank-sif encrypt app.sif app-enc.sif                  # asks for a passphrase, twice
  spank-sif encrypt rootfs.sqfs app-enc.sif --passphrase-file ~/.keys/app.pass

The key: --pem-path names an RSA public key (PKCS#1 'RSA PUBLIC KEY' as keygen and Apptainer write
it, or 'PUBLIC KEY'); the image then opens with the matching private key. --passphrase-file is read
byte for byte (a trailing newline is part of the passphrase: write it with printf, not echo).
Without either, the passphrase is asked for on the terminal. Never on the command line.

Key derivation: every unlock on a compute node pays it, so it is chosen here, not measured on this
host as cryptsetup would. Default: argon2id, {DEFAULT_KDF.memory_kib // 1024} MiB, \
{DEFAULT_KDF.time} passes, {DEFAULT_KDF.threads} lane.
--kdf pbkdf2 (for FIPS sites): {builder.DEFAULT_PBKDF2_ITERATIONS} iterations of SHA-256 by default.
The site's cap (kdf_max_memory_kib) is checked. In PEM mode the LUKS passphrase is 64 random bytes:
a cheap KDF is as safe there, and every step unlocks faster. Sector size: 4096 by default; 512 for
nodes with kernels older than 4.12.

exit codes:
  0   written
  3   IN unusable: not a SIF image or squashfs, already encrypted, corrupt
  4   unusable key: no or empty passphrase, a public key that is not RSA, or too small
  5   the KDF cost is above the site's cap
  7   this host cannot do it: OUT's file system is full, cryptsetup missing or too old
  64  usage error (OUT exists without --force, bad option)
  130 interrupted (nothing written)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("encrypt", help="encrypt a plain SIF image or squashfs, no root needed",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="IN", help="plain SIF image, or squashfs file")
    p.add_argument("out", metavar="OUT", help="encrypted SIF image to write")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--passphrase-file", metavar="F", help="read the passphrase from F (exact bytes)")
    key.add_argument("--pem-path", metavar="PUBLIC.pem", help="encrypt for this RSA public key (PEM mode)")
    p.add_argument("--kdf", choices=builder.KDF_TYPES, default="argon2id",
                   help="key derivation function (default argon2id)")
    p.add_argument("--kdf-memory", metavar="SIZE", type=_kib,
                   help=f"Argon2 memory, in KiB or with a unit: 256M, 1G (default {DEFAULT_KDF.memory_kib // 1024}M)")
    p.add_argument("--kdf-time", metavar="N", type=int,
                   help=f"Argon2 passes (default {DEFAULT_KDF.time}), or PBKDF2 iterations "
                        f"(default {builder.DEFAULT_PBKDF2_ITERATIONS})")
    p.add_argument("--kdf-threads", metavar="N", type=int,
                   help=f"Argon2 lanes, 1 to 4 (default {DEFAULT_KDF.threads})")
    p.add_argument("--sector-size", metavar="N", type=int, default=builder.DEFAULT_SECTOR_SIZE,
                   choices=builder.SECTOR_SIZES, help="encryption sector size: 4096 (default) or 512")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_config_option(p)
    p.set_defaults(func=encrypt)


def _kib(text: str) -> int:
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].isalpha() else (text, "K")
    if unit not in units or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (KiB, or with a unit: 256M, 1G)")
    return int(number) * units[unit]


def encrypt(args) -> int:
    kdf = builder.make_kdf(args.kdf, args.kdf_memory, args.kdf_time, args.kdf_threads)
    config = site_config(args)
    if kdf.memory_kib > config.kdf_max_memory_kib:
        raise PolicyError(f"--kdf-memory {kdf.memory_kib} KiB is above the site's cap of "
                          f"{config.kdf_max_memory_kib} KiB (kdf_max_memory_kib in {config.source}): "
                          "nodes would refuse the image; choose less")
    # Bad input is reported before a passphrase is asked for.
    os.close(builder.open_source(args.source).fd)
    builder.check_target(args.out, args.force)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: remove what was started
        if signal.getsignal(signum) != signal.SIG_IGN:  # but nohup's choice stands
            signal.signal(signum, _interrupt)
    bar = _Progress() if sys.stderr.isatty() else None
    try:
        built = _build(args, kdf, bar)
    except KeyboardInterrupt:
        if bar:
            bar.clear()
        print(f"spank-sif: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    if bar:
        bar.clear()
    if built.dropped:
        names = ", ".join(f"{d.type.label} id {d.id}" for d in built.dropped)
        print(f"spank-sif: warning: left out of {args.out}: {names} (signatures would not match the "
              "encrypted image: sign it again; crypto messages belong to another key)", file=sys.stderr)
    how = f"for the private key of {args.pem_path}" if built.mode == "pem" else "with the passphrase"
    print(f"{args.out}: encrypted {how}; key derivation {kdf.cost.describe()}, "
          f"{built.sector_size}-byte sectors")
    return 0


def _build(args, kdf: builder.Kdf, progress) -> builder.BuiltImage:
    if args.pem_path:
        pem = read_key_file(args.pem_path, keys.MAX_PEM_FILE, "--pem-path")
        return builder.build_encrypted_image(
            args.source, args.out, public_key=builder.load_public_key(pem, args.pem_path), kdf=kdf,
            sector_size=args.sector_size, force=args.force, progress=progress)
    with _passphrase(args.passphrase_file) as passphrase:
        return builder.build_encrypted_image(
            args.source, args.out, passphrase=passphrase, kdf=kdf, sector_size=args.sector_size,
            force=args.force, progress=progress)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _passphrase(path: str | None) -> Secret:
    if path is not None:
        source = keys.passphrase_from_file(read_key_file(path, keys.MAX_PASSPHRASE, "--passphrase-file"), path)
        assert source.secret is not None
        return source.secret
    if not sys.stdin.isatty():
        raise UsageError("no key: give --passphrase-file F or --pem-path PUBLIC.pem, or run on a "
                         "terminal to type a passphrase")
    import getpass
    try:
        first = Secret(getpass.getpass("Passphrase for the image: ").encode())
        again = Secret(getpass.getpass("The same passphrase again: ").encode())
    except EOFError as exc:
        raise KeyMaterialError("no passphrase typed") from exc
    with again:
        if not first.value:
            raise KeyMaterialError("an empty passphrase protects nothing; type one")
        if first.value != again.value:
            first.wipe()
            raise KeyMaterialError("the two passphrases differ; nothing was written")
    return first


class _Progress:
    """A one-line progress bar on stderr (a terminal), for images large enough to wait for."""

    WIDTH = 30

    def __init__(self):
        self.start = time.monotonic()
        self.shown = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if total < PROGRESS_FROM or (now - self.shown < 0.25 and done < total):
            return
        self.shown = now
        filled = self.WIDTH * done // total
        rate = done / max(now - self.start, 1e-3) / 2**20
        sys.stderr.write(f"\rencrypting [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                         f"{100 * done // total:3d}% {done / 2**30:.1f}/{total / 2**30:.1f} GiB {rate:.0f} MiB/s")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
