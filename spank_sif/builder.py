"""Encrypted SIF images made by an ordinary user: no root, no device-mapper (``spank-sif encrypt``).

Apptainer encrypts as root: it formats a LUKS2 volume of (squashfs size + 16 MiB) on a loop device
and copies the squashfs in through dm-crypt. The volume it leaves is two parts, and both can be made
without the kernel:

- the header region, the volume's first 16 MiB (binary headers, JSON metadata, keyslot area): made
  by the real ``cryptsetup luksFormat`` on a small scratch file, with the same options Apptainer's
  cryptsetup uses by default, stated explicitly, and the KDF cost chosen for the compute nodes
  instead of benchmarked on this host. Its data segment is "dynamic" (to the end of the device), so
  this region is the same for any data size and goes in front of the data as it is. The volume key
  is ours: it reaches cryptsetup through a pipe, the passphrase on stdin; neither in argv nor a file.
- the data: the squashfs encrypted here, streaming, exactly as dm-crypt encrypts it
  (aes-xts-plain64: each sector one XTS data unit whose tweak is its position in 512-byte units).

The image is written to a hidden temporary file next to OUT, checked (the keyslot's KDF is the one
asked for, the volume key matches the header's digest, the first sector decrypts to a squashfs) and
only then renamed to OUT: a failure or an interruption leaves nothing behind.
"""
import contextlib
import hashlib
import hmac
import os
import platform
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from typing import NamedTuple

from spank_sif import keys, luks2, sif
from spank_sif.errors import (ImageError, KeyMaterialError, SystemSetupError, UnsupportedImageError,
                              UsageError)
from spank_sif.fdio import read_exact
from spank_sif.secret import Secret

LUKS_DATA_OFFSET = 16 << 20   # Apptainer's layout with cryptsetup >= 2.1: header region, then data
CIPHER = "aes-xts-plain64"
VOLUME_KEY_BYTES = 64         # AES-256-XTS, cryptsetup's default since 2.1
PEM_KEY_BYTES = 64            # Apptainer's PEM mode: 64 random bytes are the LUKS passphrase
SECTOR_SIZES = (512, 4096)
DEFAULT_SECTOR_SIZE = 4096     # cryptsetup's own choice on files; encrypting costs per sector
MIN_RSA_BITS = 2048
CHUNK = 4 << 20               # bytes encrypted per step: memory use does not depend on the image
SQUASHFS_MAGIC = b"hsqs"
LUKS_MAGIC = b"LUKS\xba\xbe"

# Architecture names of platform.machine() that differ from SIF's (Go's) names.
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386", "armv7l": "arm",
             "loongarch64": "loong64"}


# ---------------------------------------------------------------------------------------------
# Key derivation cost


class Kdf(NamedTuple):
    """The key-derivation cost stored in the keyslot, which every unlock on a node pays.

    ``time`` is Argon2's passes, or PBKDF2's iteration count (cryptsetup's --pbkdf-force-iterations
    means either); ``memory_kib`` and ``threads`` are Argon2's only."""

    type: str = "argon2id"
    memory_kib: int = 262144
    time: int = 4
    threads: int = 1

    @property
    def cost(self) -> luks2.KdfCost:
        """As ``luks2`` reads it back from a keyslot."""
        if self.type == "pbkdf2":
            return luks2.KdfCost("pbkdf2", iterations=self.time)
        return luks2.KdfCost(self.type, memory_kib=self.memory_kib, time=self.time, threads=self.threads)

    def cryptsetup_args(self) -> list:
        args = ["--pbkdf", self.type, "--pbkdf-force-iterations", str(self.time)]
        if self.type != "pbkdf2":
            args += ["--pbkdf-memory", str(self.memory_kib), "--pbkdf-parallel", str(self.threads)]
        return args


KDF_TYPES = ("argon2id", "pbkdf2")
DEFAULT_PBKDF2_ITERATIONS = 1_000_000
# cryptsetup's limits (a format outside them fails): Argon2 4 passes at least, 32 KiB to 4 GiB,
# 1 to 4 threads; PBKDF2 1000 iterations at least.
ARGON2_MIN_TIME, ARGON2_MIN_MEMORY_KIB, ARGON2_MAX_MEMORY_KIB, ARGON2_MAX_THREADS = 4, 32, 4 << 20, 4
PBKDF2_MIN_ITERATIONS = 1000


def make_kdf(kind: str = "argon2id", memory_kib: int | None = None, time: int | None = None,
             threads: int | None = None) -> Kdf:
    """A checked ``Kdf``; parameters left out take the defaults of ``kind``. UsageError otherwise."""
    if kind not in KDF_TYPES:
        raise UsageError(f"--kdf {kind}: choose one of {', '.join(KDF_TYPES)}")
    if kind == "pbkdf2":
        if memory_kib is not None or threads is not None:
            raise UsageError("--kdf-memory and --kdf-threads apply to Argon2 only, not to --kdf pbkdf2")
        iterations = DEFAULT_PBKDF2_ITERATIONS if time is None else time
        if not PBKDF2_MIN_ITERATIONS <= iterations < 2**32:
            raise UsageError(f"--kdf-time {iterations}: PBKDF2 needs {PBKDF2_MIN_ITERATIONS} to "
                             f"{2**32 - 1} iterations")
        return Kdf("pbkdf2", 0, iterations, 1)
    default = Kdf()
    kdf = Kdf(kind, default.memory_kib if memory_kib is None else memory_kib,
              default.time if time is None else time, default.threads if threads is None else threads)
    if not ARGON2_MIN_TIME <= kdf.time < 2**32:
        raise UsageError(f"--kdf-time {kdf.time}: Argon2 needs {ARGON2_MIN_TIME} passes or more")
    if not 1 <= kdf.threads <= ARGON2_MAX_THREADS:
        raise UsageError(f"--kdf-threads {kdf.threads}: choose 1 to {ARGON2_MAX_THREADS}")
    low = max(ARGON2_MIN_MEMORY_KIB, 8 * kdf.threads)
    if not low <= kdf.memory_kib <= ARGON2_MAX_MEMORY_KIB:
        raise UsageError(f"--kdf-memory {kdf.memory_kib} KiB: choose {low} KiB to "
                         f"{ARGON2_MAX_MEMORY_KIB} KiB (4 GiB)")
    return kdf


# ---------------------------------------------------------------------------------------------
# The input


class Source(NamedTuple):
    """What IN holds: a squashfs at ``offset`` (``size`` bytes) of the open ``fd``, and for a SIF the
    image and its primary partition."""

    path: str
    fd: int
    offset: int
    size: int
    image: sif.SifImage | None = None
    partition: sif.Descriptor | None = None

    @property
    def dropped(self) -> list:
        """Objects not carried over: signatures (they would no longer match) and crypto messages
        (they hold some other key)."""
        if self.image is None:
            return []
        return [d for d in self.image.descriptors
                if d.type in (sif.DataType.SIGNATURE, sif.DataType.CRYPTO_MESSAGE)]


def open_source(path: str) -> Source:
    """Open IN (a plain SIF or a bare squashfs) and check it can be encrypted. The caller closes
    ``Source.fd``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise ImageError(f"{path}: cannot open it: {err.strerror}") from err
    try:
        return _source(path, fd)
    except BaseException:
        os.close(fd)
        raise


def _source(path: str, fd: int) -> Source:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file: give a plain SIF image or a squashfs file")
    size = st.st_size
    start = read_exact(fd, min(size, sif.HEADER.size), 0, path)
    if start[32:32 + len(sif.MAGIC)] == sif.MAGIC:
        image = sif.read_sif(fd, size, name=path)
        part = _plain_partition(image, path)
        if part.size == 0 or os.pread(fd, 4, part.offset) != SQUASHFS_MAGIC:
            raise ImageError(f"{path}: the primary partition (id {part.id}) says squashfs but does not "
                             "hold one: the image is corrupt")
        return Source(path, fd, part.offset, part.size, image, part)
    if start[:4] == SQUASHFS_MAGIC:
        return Source(path, fd, 0, size)
    if start[:6] == LUKS_MAGIC:
        raise UnsupportedImageError(f"{path}: is a LUKS volume, already encrypted; give the plain SIF "
                                    "image or squashfs file it was made from")
    raise ImageError(f"{path}: neither a SIF image nor a squashfs file: give a plain SIF image (as "
                     "'apptainer build' makes without --encrypt) or a squashfs file (as mksquashfs makes)")


def _plain_partition(image: sif.SifImage, path: str) -> sif.Descriptor:
    found = [d for d in image.descriptors
             if d.type == sif.DataType.PARTITION and d.part_type == sif.PartType.PRIMSYS]
    if len(found) == 1 and found[0].fs_type != sif.FsType.SQUASHFS:
        part = found[0]
        if part.fs_type in (sif.FsType.ENCRYPTED_SQUASHFS, sif.FsType.GOCRYPTFS_SQUASHFS):
            raise UnsupportedImageError(f"{path}: already encrypted ({sif.label(part.fs_type)} primary "
                                        "partition); give the plain image it was made from")
        raise UnsupportedImageError(f"{path}: the primary partition (id {part.id}) holds a "
                                    f"{sif.label(part.fs_type)} file system; encrypt takes squashfs only")
    return image.primary_partition()  # none or several: its message says which


# ---------------------------------------------------------------------------------------------
# The output


class BuiltImage(NamedTuple):
    path: str
    mode: str                 # "passphrase" or "pem"
    kdf: Kdf
    sector_size: int
    data_size: int            # bytes of squashfs encrypted (padded to whole sectors)
    dropped: tuple            # descriptors of IN not carried over


def build_encrypted_image(source_path: str, out: str, *, passphrase=None, public_key=None,
                          kdf: Kdf | None = None, sector_size: int = DEFAULT_SECTOR_SIZE, force: bool = False,
                          progress: Callable[[int, int], None] | None = None) -> BuiltImage:
    """Write ``out``: ``source_path`` (a plain SIF or a bare squashfs) with its squashfs encrypted,
    laid out as Apptainer lays out an encrypted image. Passphrase mode with ``passphrase`` (bytes or
    ``Secret``), PEM mode with ``public_key`` (an RSA public key, see ``load_public_key``); ``kdf``
    defaults to ``Kdf()``. ``progress(done, total)`` is called as data is encrypted. ``out`` is
    replaced only if ``force``."""
    kdf = kdf or Kdf()
    if (passphrase is None) == (public_key is None):
        raise UsageError("give either a passphrase or a public key")
    if sector_size not in SECTOR_SIZES:
        raise UsageError(f"--sector-size {sector_size}: choose 512 or 4096")
    check_target(out, force)
    src = open_source(source_path)
    luks_key = volume_key = None
    try:
        data_size = -(-src.size // sector_size) * sector_size
        _check_space(out, src, data_size)
        if public_key is not None:
            luks_key = Secret(os.urandom(PEM_KEY_BYTES))
            message = keys.wrap_key(public_key, luks_key.value)
        else:
            luks_key = passphrase if isinstance(passphrase, Secret) else Secret(passphrase)
            message = None
        volume_key = Secret(os.urandom(VOLUME_KEY_BYTES))
        with tempfile.TemporaryDirectory(prefix="spank-sif-encrypt-") as scratch:
            header = os.path.join(scratch, "header.luks")
            format_header(header, luks_key, volume_key, kdf, sector_size)

            def partition(fd: int, offset: int) -> int:
                _copy_header(header, fd, offset)
                encrypt_data(src, fd, offset + LUKS_DATA_OFFSET, volume_key.value, sector_size, progress)
                return LUKS_DATA_OFFSET + data_size

            _write_atomically(out, force, lambda fd: _assemble(fd, src, partition, message, volume_key,
                                                               data_size))
    finally:
        os.close(src.fd)
        if volume_key is not None:
            volume_key.wipe()
        if luks_key is not None and luks_key is not passphrase:
            luks_key.wipe()
    return BuiltImage(out, "pem" if message else "passphrase", kdf, sector_size, data_size,
                      tuple(src.dropped))


def check_target(out: str, force: bool) -> None:
    """Refuse an OUT that cannot be written before any work (and before a passphrase is asked for)."""
    if os.path.isdir(out):
        raise UsageError(f"{out} is a directory; name the image file to write")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} already exists; use --force to replace it")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UsageError(f"{out}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"{out}: you cannot create files in {directory}")


def _check_space(out: str, src: Source, data_size: int) -> None:
    """Refuse at once, instead of after minutes of work, when OUT's file system cannot hold it."""
    needed = LUKS_DATA_OFFSET + data_size + (src.image.file_size - src.size if src.image else 0)
    directory = os.path.dirname(os.path.abspath(out))
    try:
        st = os.statvfs(directory)
    except OSError as err:
        raise UsageError(f"{out}: cannot write in {directory}: {err.strerror}") from err
    free = st.f_bavail * st.f_frsize
    if st.f_blocks and free < needed:
        raise SystemSetupError(f"{out}: not enough space in {directory}: the image needs "
                               f"{_size(needed)}, {_size(free)} are free")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _assemble(fd: int, src: Source, partition, message, volume_key, data_size: int) -> None:
    image = sif.write_sif(fd, output_objects(src, partition, message))
    verify_output(fd, image, volume_key, data_size)


def output_objects(src: Source, partition, message: bytes | None) -> list:
    """OUT's objects: a bare squashfs gets Apptainer's layout; a SIF keeps its objects in their
    order (but signatures and crypto messages), its primary partition encrypted and, in PEM mode,
    the crypto message right after it, as Apptainer writes it. IDs are renumbered 1.. in that order
    (as every SIF writer does), and links between objects follow."""
    if src.image is None:
        arch = HOST_ARCH.get(platform.machine(), platform.machine())
        return sif.apptainer_layout(partition, arch=arch if arch in sif.ARCH_BY_NAME else "unknown",
                                    crypto_message=message)
    assert src.partition is not None
    part_id, dropped = src.partition.id, {d.id for d in src.dropped}
    order: list[sif.Descriptor | None] = []
    for d in src.image.descriptors:
        if d.id not in dropped:
            order.append(d)
            if d.id == part_id and message is not None:
                order.append(None)  # the crypto message's place
    new_id = {d.id: index + 1 for index, d in enumerate(order) if d is not None}
    objects = []
    for entry in order:
        if entry is None:
            objects.append(sif.SifObject.crypto_message(message, link=new_id[part_id]))
            continue
        link = entry.link if entry.link_is_group or not entry.link else new_id.get(entry.link, 0)
        if entry.id == part_id:
            extra = bytearray(entry.extra)
            struct.pack_into("<i", extra, 0, sif.FsType.ENCRYPTED_SQUASHFS)
            data, extra_bytes = partition, bytes(extra)
        else:
            data, extra_bytes = _copier(src.fd, entry.offset, entry.size), entry.extra
        objects.append(sif.SifObject(entry.type, data, group=entry.group, link=link,
                                     link_is_group=entry.link_is_group, name=entry.name, extra=extra_bytes))
    return objects


def verify_output(fd: int, image: sif.SifImage, volume_key, data_size: int) -> None:
    """Check the written image as a reader will see it; a failure is a bug here or in cryptsetup."""
    part = image.primary_partition()
    volume = luks2.read_luks2(fd, part.offset, part.size)
    if (part.fs_type != sif.FsType.ENCRYPTED_SQUASHFS or volume.segment.offset != LUKS_DATA_OFFSET
            or volume.segment.size != data_size
            or luks2.decrypt_sectors(volume, fd, volume_key, 0, 1)[:4] != SQUASHFS_MAGIC):
        raise SystemSetupError("the encrypted image does not read back as written (a bug: please "
                               "report it); nothing was written")


# ---------------------------------------------------------------------------------------------
# The LUKS2 header region, by cryptsetup


def _cryptsetup() -> str:
    path = shutil.which("cryptsetup", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise SystemSetupError("cryptsetup is not installed: install the cryptsetup-bin package")
    return path


def format_header(path: str, luks_key, volume_key, kdf: Kdf, sector_size: int) -> None:
    """A LUKS2 volume at ``path`` (created) whose header region is OUT's, for ``volume_key``, with
    one keyslot opened by ``luks_key`` at ``kdf``'s cost. Checks what cryptsetup stored."""
    with open(path, "wb") as f:
        f.truncate(LUKS_DATA_OFFSET + sector_size)  # one data sector: cryptsetup wants some
    # Every option Apptainer leaves to cryptsetup's defaults is given, so the result does not depend
    # on this host's cryptsetup version or benchmark; --disable-locks because an ordinary user
    # cannot take cryptsetup's lock in /run/cryptsetup (and nobody else knows this file).
    argv = [_cryptsetup(), "luksFormat", "--batch-mode", "--type", "luks2", "--disable-locks",
            "--cipher", CIPHER, "--key-size", str(8 * VOLUME_KEY_BYTES), "--hash", "sha256",
            "--sector-size", str(sector_size), "--offset", str(LUKS_DATA_OFFSET // luks2.SECTOR),
            *kdf.cryptsetup_args(), "--key-file", "-"]
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, volume_key.value)  # 64 bytes: the pipe holds them, no thread needed
        os.close(write_end)
        write_end = -1
        done = subprocess.run([*argv, "--volume-key-file", f"/dev/fd/{read_end}", path],
                              input=luks_key.value, capture_output=True, pass_fds=(read_end,), check=False)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if done.returncode != 0:
        reason = " ".join(done.stderr.decode(errors="replace").split()) or f"exit {done.returncode}"
        raise SystemSetupError(f"cryptsetup could not make the LUKS2 header: {reason}")
    _check_header(path, volume_key, kdf, sector_size)


def _check_header(path: str, volume_key, kdf: Kdf, sector_size: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        volume = luks2.read_luks2(fd)
    finally:
        os.close(fd)
    [keyslot] = volume.keyslots
    if keyslot.kdf != kdf.cost:
        raise SystemSetupError(
            f"this host's cryptsetup stored the key derivation as {keyslot.kdf.describe()} instead of "
            f"{kdf.cost.describe()}" + (f" (it stores no more Argon2 threads than this host has CPUs: "
                                        f"use --kdf-threads {keyslot.kdf.threads} or build on a larger host)"
                                        if keyslot.kdf.threads < kdf.threads else ""))
    segment = volume.segment
    [digest] = [d for d in volume.digests if 0 in d.segments]
    matches = hmac.compare_digest(digest.digest, hashlib.pbkdf2_hmac(
        digest.hash, volume_key.value, digest.salt, digest.iterations, len(digest.digest)))
    if (segment.offset, segment.sector_size, segment.cipher, matches) != (
            LUKS_DATA_OFFSET, sector_size, CIPHER, True):
        raise SystemSetupError(f"this host's cryptsetup made another LUKS2 layout than asked (data at "
                               f"{segment.offset}, {segment.sector_size}-byte sectors, {segment.cipher}); "
                               "spank-sif encrypt needs cryptsetup 2.1 or later")


def _copy_header(header: str, fd: int, offset: int) -> None:
    src = os.open(header, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _copy(src, 0, LUKS_DATA_OFFSET, fd, offset)
    finally:
        os.close(src)


# ---------------------------------------------------------------------------------------------
# Data


def _copier(src_fd: int, offset: int, size: int):
    """A ``sif.SifObject`` fill function copying ``size`` bytes of ``src_fd`` from ``offset``."""
    def fill(fd: int, at: int) -> int:
        _copy(src_fd, offset, size, fd, at)
        return size
    return fill


def _copy(src_fd: int, offset: int, size: int, fd: int, at: int) -> None:
    """Copy in bounded chunks; all-zero chunks are skipped (the file stays sparse there)."""
    done = 0
    while done < size:
        chunk = read_exact(src_fd, min(CHUNK, size - done), offset + done, "the input")
        if chunk.count(0) != len(chunk):
            write_all(fd, chunk, at + done)
        done += len(chunk)


def write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def encrypt_data(src: Source, fd: int, offset: int, key, sector_size: int, progress=None) -> int:
    """Encrypt the squashfs of ``src`` into ``fd`` at ``offset`` as dm-crypt would write it through
    a mapping of ``sector_size``-byte sectors; the last sector is padded with zeros. Returns the
    bytes written."""
    total = -(-src.size // sector_size) * sector_size
    with contextlib.suppress(OSError):  # only a hint
        os.posix_fadvise(src.fd, src.offset, src.size, os.POSIX_FADV_SEQUENTIAL)
    done = 0
    while done < total:
        length = min(CHUNK, total - done)
        plain = read_exact(src.fd, min(length, src.size - done), src.offset + done, src.path).ljust(length, b"\0")
        write_all(fd, xts_encrypt(key, plain, sector_size, done // luks2.SECTOR), offset + done)
        done += length
        if progress:
            progress(done, total)
    return total


def xts_encrypt(key, data, sector_size: int, first_iv: int) -> bytes:
    """aes-xts-plain64 as dm-crypt: ``data`` in ``sector_size`` units, the first one's IV (tweak)
    ``first_iv``, counted in 512-byte units whatever the sector size (as LUKS2 does).

    One of cryptography's XTS contexts per sector: OpenSSL computes each sector's tweak sequence,
    which is what a pure-Python XTS spends its time on (bench/bench_encrypt.py measures it)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    aes, xts, step = algorithms.AES(key), modes.XTS, sector_size // luks2.SECTOR
    view = memoryview(data)
    return b"".join([Cipher(aes, xts(((first_iv + n * step) & luks2.UINT64_MAX).to_bytes(16, "little")))
                     .encryptor().update(view[at:at + sector_size])
                     for n, at in enumerate(range(0, len(view), sector_size))])


# ---------------------------------------------------------------------------------------------
# Output file


def _write_atomically(out: str, force: bool, write: Callable[[int], None]) -> None:
    """Run ``write(fd)`` on a hidden temporary file next to ``out``, then move it into place; on
    any failure (a full disk) or interruption, remove it: ``out`` is never partial."""
    directory, name = os.path.split(os.path.abspath(out))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    except OSError as err:
        raise UsageError(f"{out}: cannot create a file in {directory}: {err.strerror}") from err
    try:
        try:
            write(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o755 & ~umask)  # as SIF writers make images: executable (launch script)
            os.fsync(fd)
        except OSError as err:
            raise SystemSetupError(f"{out}: cannot write the image: {err.strerror}; nothing was "
                                   "written") from err
        finally:
            os.close(fd)
        _publish(tmp, out, force)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _publish(tmp: str, out: str, force: bool) -> None:
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # unlike rename, never replaces a file that appeared meanwhile
    except FileExistsError as exc:
        raise UsageError(f"{out} already exists (created while encrypting); use --force to replace "
                         "it") from exc
    except OSError as exc:  # a file system without hard links
        if os.path.lexists(out):
            raise UsageError(f"{out} already exists; use --force to replace it") from exc
        os.replace(tmp, out)
        return
    os.unlink(tmp)


# ---------------------------------------------------------------------------------------------
# Keys


def load_public_key(data: bytes, origin: str):
    """The RSA public key in PEM ``data``: PKCS#1 ("RSA PUBLIC KEY", as Apptainer and keygen write
    it) or SubjectPublicKeyInfo ("PUBLIC KEY", as openssl writes it). Anything else, a key too small
    to protect the image, or a private key given by mistake: ``KeyMaterialError``."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    if data.lstrip().startswith(b"ssh-"):
        raise KeyMaterialError(f"{origin}: an OpenSSH public key; convert it to PEM with: "
                               f"ssh-keygen -e -m pem -f {origin} > key.pub.pem")
    if b"PRIVATE KEY-----" in data:
        raise KeyMaterialError(f"{origin}: holds a private key; encrypt needs the public key (the "
                               "--public file of spank-sif keygen); keep the private key for running")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"{origin}: not a PEM public key (expected '-----BEGIN RSA PUBLIC KEY-----' "
                               "or '-----BEGIN PUBLIC KEY-----'); make a key pair with spank-sif keygen") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyMaterialError(f"{origin}: not an RSA key; Apptainer's PEM encryption needs RSA "
                               "(make a key pair with spank-sif keygen)")
    if key.key_size < MIN_RSA_BITS:
        raise KeyMaterialError(f"{origin}: a {key.key_size}-bit RSA key is too weak to protect an image; "
                               f"use {MIN_RSA_BITS} bits or more (spank-sif keygen makes 4096)")
    return key
