"""LUKS2 in userspace: headers, keyslots, KDF cost, key check and sector decryption.

No root, no device-mapper: everything is read with ``os.pread`` from an already-open fd, at the
volume's offset inside that file (a SIF partition, or 0 for a bare volume). The on-disk format is
cryptsetup's (its docs/on-disk-format-luks2.pdf; docs/formats.md, "LUKS2"):

- two copies of a binary header (4096 bytes: magic, big-endian version 2, header size, sequence id,
  checksum algorithm, UUID, offset of the copy, checksum), each followed by its JSON area; the
  checksum covers the binary header (checksum field zeroed) plus the JSON area;
- JSON metadata: keyslots (KDF, anti-forensic split, encrypted area), segments (the data), digests
  (a PBKDF2 of the volume key that tells a right key from a wrong one), config.

The metadata is hostile input: every number is checked against the volume size and against
cryptsetup's own limits before anything is allocated or read, and every failure is an
``ImageError`` (malformed) or ``UnsupportedImageError`` (valid but not something we can open).
"""
import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from typing import NamedTuple

from spank_sif.errors import ImageError, PolicyError, SifError, UnsupportedImageError, WrongKeyError
from spank_sif.fdio import read_exact
from spank_sif.secret import Secret, buffer

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
BINARY_HEADER_SIZE = 4096
# Header sizes cryptsetup allows (binary header + JSON area), and so where a secondary copy can sit.
HEADER_SIZES = tuple(0x4000 << n for n in range(9))  # 16 KiB .. 4 MiB
CHECKSUM_ALGORITHMS = ("sha1", "sha256", "sha512")
HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512")
SUPPORTED_CIPHER = "aes-xts-plain64"
XTS_KEY_SIZES = (32, 64)  # AES-128-XTS, AES-256-XTS
MAX_KEYSLOTS = 32
MAX_STRIPES = 4000  # cryptsetup's only value; bounds the keyslot material to 256 KB
# cryptsetup's limits (lib/crypto_backend/pbkdf_check.c); anything beyond is not a cryptsetup volume.
ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024
ARGON2_MAX_THREADS = 16
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
PRIORITY_IGNORE, PRIORITY_NORMAL, PRIORITY_PREFER = 0, 1, 2
SECTOR = 512  # keyslot areas and IVs count in 512-byte units whatever the data sector size


class KdfCost(NamedTuple):
    """What running a keyslot's KDF costs: the site cap is checked against this before running it.

    Argon2 keyslots have ``memory_kib``, ``time`` (passes) and ``threads``; PBKDF2 keyslots have
    ``iterations`` (and no memory to speak of)."""

    type: str
    memory_kib: int = 0
    time: int = 0
    iterations: int = 0
    threads: int = 1

    def describe(self) -> str:
        if self.type == "pbkdf2":
            return f"pbkdf2, {self.iterations} iterations"
        return f"{self.type}, {self.memory_kib} KiB, {self.time} passes, {self.threads} threads"


class Keyslot(NamedTuple):
    id: int
    priority: int
    key_size: int  # of the volume key it holds
    kdf: KdfCost
    kdf_hash: str  # pbkdf2 only
    kdf_salt: bytes
    af_stripes: int
    af_hash: str
    area_offset: int  # relative to the volume start
    area_size: int
    area_key_size: int  # of the key the KDF derives to decrypt the area


class Segment(NamedTuple):
    offset: int  # relative to the volume start
    size: int  # bytes ("dynamic" resolved against the volume size)
    cipher: str
    sector_size: int
    iv_tweak: int

    @property
    def sectors(self) -> int:
        return self.size // self.sector_size


class Digest(NamedTuple):
    id: int
    keyslots: frozenset
    segments: frozenset
    hash: str
    iterations: int
    salt: bytes
    digest: bytes


class Luks2Volume(NamedTuple):
    offset: int  # of the volume in the file
    size: int
    uuid: str
    label: str
    seqid: int
    header_size: int
    header_copy: str  # "primary" or "secondary": the copy the metadata came from
    keyslots: tuple  # of Keyslot, by id
    segment: Segment
    digests: tuple  # of Digest, by id


# ---------------------------------------------------------------------------------------------
# Reading the headers


def _pread(fd: int, length: int, offset: int, what: str) -> bytes:
    return read_exact(fd, length, offset, f"the LUKS2 {what}")


def read_luks2(fd: int, offset: int = 0, size: int | None = None) -> Luks2Volume:
    """Read, checksum-verify and validate the LUKS2 volume of ``size`` bytes at ``offset`` in ``fd``."""
    if size is None:
        try:
            size = os.fstat(fd).st_size - offset
        except OSError as exc:
            raise ImageError(f"cannot stat the image: {exc.strerror}") from exc
    if offset < 0 or size < 2 * HEADER_SIZES[0]:
        raise ImageError(f"LUKS2 volume of {size} bytes is too small to hold its two headers")
    copies: list = []
    problems: list[str] = []
    primary = _read_copy(fd, offset, size, 0, MAGIC_PRIMARY, problems)
    if primary:
        copies.append(("primary", primary))
    # The secondary sits right after the primary; if the primary is unreadable, look where it may be.
    for where in ((primary[0]["hdr_size"],) if primary else HEADER_SIZES):
        secondary = _read_copy(fd, offset, size, where, MAGIC_SECONDARY, problems if primary else [])
        if secondary:
            copies.append(("secondary", secondary))
            break
    if not copies:
        raise ImageError(problems[0] if problems else "no LUKS2 header found")
    # Both valid: cryptsetup trusts the newer one (higher seqid), the primary on a tie.
    name, (fields, metadata) = max(copies, key=lambda c: (c[1][0]["seqid"], c[0] == "primary"))
    return _volume(fields, metadata, name, offset, size)


def _read_copy(fd, offset, size, where, magic, problems):
    """One header copy at ``where`` -> (binary fields, JSON dict), or None (problem appended)."""
    name = "primary" if magic == MAGIC_PRIMARY else "secondary"
    if where + BINARY_HEADER_SIZE > size:
        return None
    raw = _pread(fd, BINARY_HEADER_SIZE, offset + where, f"{name} header")
    if raw[:6] != magic:
        if where == 0:
            problems.append("not a LUKS2 volume (no LUKS magic at its start)")
        return None
    fields = {
        "version": int.from_bytes(raw[6:8], "big"),
        "hdr_size": int.from_bytes(raw[8:16], "big"),
        "seqid": int.from_bytes(raw[16:24], "big"),
        "label": _cstring(raw[24:72]),
        "checksum_alg": _cstring(raw[72:104]),
        "uuid": _cstring(raw[168:208]),
        "hdr_offset": int.from_bytes(raw[256:264], "big"),
    }
    if fields["version"] != 2:
        problems.append(f"{name} header has LUKS version {fields['version']}, only LUKS2 is supported")
        return None
    hdr_size = fields["hdr_size"]
    if hdr_size not in HEADER_SIZES or (where and where != hdr_size):
        problems.append(f"{name} LUKS2 header has an invalid header size {hdr_size}")
        return None
    if fields["hdr_offset"] != where or 2 * hdr_size > size:
        problems.append(f"{name} LUKS2 header claims offset {fields['hdr_offset']} (it is at {where})"
                        if fields["hdr_offset"] != where else
                        f"LUKS2 headers of {hdr_size} bytes do not fit in a {size}-byte volume")
        return None
    if fields["checksum_alg"] not in CHECKSUM_ALGORITHMS:
        problems.append(f"{name} LUKS2 header has an unsupported checksum {fields['checksum_alg']!r}")
        return None
    area = raw + _pread(fd, hdr_size - BINARY_HEADER_SIZE, offset + where + BINARY_HEADER_SIZE,
                        f"{name} JSON area")
    h = hashlib.new(fields["checksum_alg"])
    h.update(area[:448] + bytes(64) + area[512:])
    if not hmac.compare_digest(h.digest(), raw[448:448 + h.digest_size]):
        problems.append(f"{name} LUKS2 header checksum mismatch (corrupted header)")
        return None
    text = area[BINARY_HEADER_SIZE:].split(b"\0", 1)[0]
    try:
        metadata = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        problems.append(f"{name} LUKS2 header has malformed JSON metadata")
        return None
    if not isinstance(metadata, dict):
        problems.append(f"{name} LUKS2 header JSON metadata is not an object")
        return None
    return fields, metadata


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


# ---------------------------------------------------------------------------------------------
# Validating the JSON metadata. Helpers take a "where" path for messages like "keyslots.0.kdf.memory".


def _field(obj: dict, key: str, where: str, kind=dict):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ImageError(f"LUKS2 metadata: {where}.{key} is missing or not a {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {dict: "JSON object", list: "list", str: "string", int: "integer"}


def _int(obj, key, where, low, high):
    value = _field(obj, key, where, int)
    if not low <= value <= high:
        raise ImageError(f"LUKS2 metadata: {where}.{key} = {value} is outside {low}..{high}")
    return value


_DECIMAL = re.compile(r"[0-9]{1,20}")


def _u64(obj, key, where, high=UINT64_MAX):
    """LUKS2 stores 64-bit numbers as decimal strings."""
    text = _field(obj, key, where, str)
    if not _DECIMAL.fullmatch(text) or int(text) > high:
        raise ImageError(f"LUKS2 metadata: {where}.{key} = {text[:24]!r} is not a number within 0..{high}")
    return int(text)


def _b64(obj, key, where, low, high):
    text = _field(obj, key, where, str)
    try:
        value = base64.b64decode(text, validate=True) if len(text) <= 4 * high else b""
    except (binascii.Error, ValueError):
        value = b""
    if not low <= len(value) <= high:
        raise ImageError(f"LUKS2 metadata: {where}.{key} is not base64 of {low}..{high} bytes")
    return value


def _choice(obj, key, where, allowed, error=UnsupportedImageError):
    value = _field(obj, key, where, str)
    if value not in allowed:
        raise error(f"LUKS2 {where}.{key} {value[:40]!r} is not supported (only {', '.join(allowed)})")
    return value


def _ids(obj: dict, where: str, high: int) -> dict:
    """A JSON object keyed by small decimal ids -> {int: dict}."""
    result = {}
    for key, value in obj.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 3 and int(key) < high):
            raise ImageError(f"LUKS2 metadata: {where} has an invalid id {key[:20]!r}")
        if not isinstance(value, dict):
            raise ImageError(f"LUKS2 metadata: {where}.{key} is not a JSON object")
        result[int(key)] = value
    return result


def _id_list(obj, key, where, high):
    items = _field(obj, key, where, list)
    if len(items) > high or not all(isinstance(i, str) and i.isascii() and i.isdigit() and len(i) <= 3
                                    for i in items):
        raise ImageError(f"LUKS2 metadata: {where}.{key} is not a list of ids")
    return frozenset(int(i) for i in items)


def _volume(fields, metadata, copy, offset, size) -> Luks2Volume:
    hdr_size = fields["hdr_size"]
    config = _field(metadata, "config", "")
    if _u64(config, "json_size", "config") != hdr_size - BINARY_HEADER_SIZE:
        raise ImageError("LUKS2 metadata: config.json_size does not match the header size")
    keyslots_end = 2 * hdr_size + _u64(config, "keyslots_size", "config", size)
    requirements = config.get("requirements", {})
    mandatory = requirements.get("mandatory", []) if isinstance(requirements, dict) else None
    if not isinstance(mandatory, list):
        raise ImageError("LUKS2 metadata: config.requirements is malformed")
    if mandatory:
        raise UnsupportedImageError(f"LUKS2 volume requires {', '.join(map(str, mandatory))[:80]} "
                                    "(an unfinished reencryption?); finish it with cryptsetup first")
    segment = _segment(_field(metadata, "segments", ""), keyslots_end, size)
    digests = tuple(_digest(i, d) for i, d in sorted(_ids(_field(metadata, "digests", ""), "digests",
                                                             MAX_KEYSLOTS).items()))
    keyslots = tuple(_keyslot(i, k, keyslots_end, hdr_size)
                     for i, k in sorted(_ids(_field(metadata, "keyslots", ""), "keyslots",
                                             MAX_KEYSLOTS).items()))
    _field(metadata, "tokens", "")
    return Luks2Volume(offset=offset, size=size, uuid=fields["uuid"], label=fields["label"],
                       seqid=fields["seqid"], header_size=hdr_size, header_copy=copy,
                       keyslots=keyslots, segment=segment, digests=digests)


def _segment(segments: dict, keyslots_end: int, size: int) -> Segment:
    by_id = _ids(segments, "segments", MAX_KEYSLOTS)
    if set(by_id) != {0}:
        raise UnsupportedImageError(f"LUKS2 volume has segments {sorted(by_id)}; only a single data "
                                    "segment 0 is supported (an unfinished reencryption?)")
    seg, where = by_id[0], "segments.0"
    _choice(seg, "type", where, ("crypt",))
    cipher = _choice(seg, "encryption", where, (SUPPORTED_CIPHER,))
    sector_size = _int(seg, "sector_size", where, 512, 4096)
    if sector_size & (sector_size - 1):
        raise ImageError(f"LUKS2 metadata: {where}.sector_size {sector_size} is not a power of two")
    start = _u64(seg, "offset", where, size)
    if start < keyslots_end or start % SECTOR:
        raise ImageError(f"LUKS2 metadata: {where}.offset {start} overlaps the header or keyslots area "
                         "or is not sector-aligned")
    length = size - start if seg.get("size") == "dynamic" else _u64(seg, "size", where, size - start)
    if length % sector_size:
        if seg.get("size") != "dynamic":
            raise ImageError(f"LUKS2 metadata: {where}.size {length} is not a multiple of the sector size")
        length -= length % sector_size  # the kernel maps whole sectors of a dynamic segment
    return Segment(offset=start, size=length, cipher=cipher, sector_size=sector_size,
                   iv_tweak=_u64(seg, "iv_tweak", where))


def _digest(ident: int, d: dict) -> Digest:
    where = f"digests.{ident}"
    _choice(d, "type", where, ("pbkdf2",))
    return Digest(id=ident, keyslots=_id_list(d, "keyslots", where, MAX_KEYSLOTS),
                  segments=_id_list(d, "segments", where, MAX_KEYSLOTS),
                  hash=_choice(d, "hash", where, HASHES),
                  iterations=_int(d, "iterations", where, 1, UINT32_MAX),
                  salt=_b64(d, "salt", where, 1, 256), digest=_b64(d, "digest", where, 16, 64))


def _keyslot(ident: int, k: dict, keyslots_end: int, hdr_size: int) -> Keyslot:
    where = f"keyslots.{ident}"
    _choice(k, "type", where, ("luks2",))
    key_size = _int(k, "key_size", where, 1, 512)
    af, area, kdf = (_field(k, name, where) for name in ("af", "area", "kdf"))
    _choice(af, "type", where + ".af", ("luks1",))
    stripes = _int(af, "stripes", where + ".af", 1, MAX_STRIPES)
    _choice(area, "type", where + ".area", ("raw",))
    _choice(area, "encryption", where + ".area", (SUPPORTED_CIPHER,))
    area_key_size = _int(area, "key_size", where + ".area", 1, 512)
    if area_key_size not in XTS_KEY_SIZES:
        raise UnsupportedImageError(f"LUKS2 {where}.area.key_size {area_key_size} is not an AES-XTS key size")
    area_offset = _u64(area, "offset", where + ".area")
    area_size = _u64(area, "size", where + ".area")
    needed = -(-key_size * stripes // SECTOR) * SECTOR
    if (area_offset < 2 * hdr_size or area_offset % SECTOR or area_size < needed
            or area_offset + area_size > keyslots_end):
        raise ImageError(f"LUKS2 metadata: {where}.area ({area_offset}+{area_size}) is outside the "
                         f"keyslots area or too small for {key_size}x{stripes} bytes")
    priority = k.get("priority", PRIORITY_NORMAL)
    if priority not in (PRIORITY_IGNORE, PRIORITY_NORMAL, PRIORITY_PREFER) or isinstance(priority, bool):
        raise ImageError(f"LUKS2 metadata: {where}.priority must be 0, 1 or 2")
    kdf_type = _choice(kdf, "type", where + ".kdf", ("argon2id", "argon2i", "pbkdf2"))
    if kdf_type == "pbkdf2":
        cost = KdfCost("pbkdf2", iterations=_int(kdf, "iterations", where + ".kdf", 1, UINT32_MAX))
        kdf_hash = _choice(kdf, "hash", where + ".kdf", HASHES)
        salt = _b64(kdf, "salt", where + ".kdf", 1, 256)
    else:
        threads = _int(kdf, "cpus", where + ".kdf", 1, ARGON2_MAX_THREADS)
        cost = KdfCost(kdf_type, memory_kib=_int(kdf, "memory", where + ".kdf", 8 * threads,
                                                 ARGON2_MAX_MEMORY_KIB),
                       time=_int(kdf, "time", where + ".kdf", 1, UINT32_MAX), threads=threads)
        kdf_hash, salt = "", _b64(kdf, "salt", where + ".kdf", 8, 256)
    return Keyslot(id=ident, priority=priority, key_size=key_size, kdf=cost, kdf_hash=kdf_hash,
                   kdf_salt=salt, af_stripes=stripes, af_hash=_choice(af, "hash", where + ".af", HASHES),
                   area_offset=area_offset, area_size=area_size, area_key_size=area_key_size)


# ---------------------------------------------------------------------------------------------
# Unlocking


def keyslot_order(volume: Luks2Volume) -> list:
    """Keyslots a passphrase is tried against, as cryptsetup tries them: only keyslots bound to the
    data segment's digest, "prefer" (2) before "normal" (1), "ignore" (0) never; by id within one."""
    bound = {ks for d in volume.digests if 0 in d.segments for ks in d.keyslots}
    usable = [k for k in volume.keyslots if k.id in bound and k.priority != PRIORITY_IGNORE]
    return sorted(usable, key=lambda k: (-k.priority, k.id))


# The one place that decides which keyslots may run, and what to say when none opened: verify-key
# (userspace) and the node engine (dm-crypt) must accept exactly the same keys.

WRONG_KEY = ("no keyslot of the image accepts this key: check the passphrase or PEM key (is it the "
             "key this image was built with?)")


def _over_cap(keyslot: Keyslot, max_memory_kib: int | None) -> bool:
    return max_memory_kib is not None and keyslot.kdf.memory_kib > max_memory_kib


def affordable_keyslots(volume: Luks2Volume, max_memory_kib: int | None) -> list:
    """The keyslots to try, in cryptsetup's order, whose KDF fits the site's cap (KiB of memory;
    None: no cap, for tools that study volumes).

    Decided before any KDF runs: raises PolicyError if no keyslot fits, UnsupportedImageError if
    the volume has no usable keyslot at all."""
    candidates = keyslot_order(volume)
    if not candidates:
        raise UnsupportedImageError("the image's LUKS2 volume has no usable keyslot (all removed or "
                                    "ignored): it cannot be opened")
    if max_memory_kib is None:
        return candidates
    allowed = [k for k in candidates if not _over_cap(k, max_memory_kib)]
    if not allowed:
        raise _cost_error(min(candidates, key=lambda k: k.kdf.memory_kib), max_memory_kib, "")
    return allowed


def no_keyslot_opened(volume: Luks2Volume, max_memory_kib: int | None) -> SifError:
    """The error once every affordable keyslot refused the key: a wrong key, unless a keyslot was
    skipped for its cost (then the key might open that one, and the cap is the reason)."""
    skipped = [k for k in keyslot_order(volume) if _over_cap(k, max_memory_kib)]
    if skipped and max_memory_kib is not None:
        return _cost_error(skipped[0], max_memory_kib, "no keyslot within the cap accepts this key; ")
    return WrongKeyError(WRONG_KEY)


def _cost_error(keyslot: Keyslot, max_memory_kib: int, prefix: str) -> PolicyError:
    return PolicyError(f"{prefix}the image's key derivation (keyslot {keyslot.id}: {keyslot.kdf.describe()}) "
                       f"needs {keyslot.kdf.memory_kib} KiB of memory, above this site's limit of "
                       f"{max_memory_kib} KiB (kdf_max_memory_kib): rebuild the image with a smaller "
                       "--pbkdf-memory or ask your admin")


def unlock(volume: Luks2Volume, fd: int, passphrase, max_kdf_memory_kib: int | None = None):
    """Try ``passphrase`` (bytes-like or Secret) on the affordable keyslots -> (keyslot id, volume
    key Secret). Raises the errors of ``affordable_keyslots`` and ``no_keyslot_opened``."""
    secret = buffer(passphrase)
    for keyslot in affordable_keyslots(volume, max_kdf_memory_kib):
        volume_key = open_keyslot(volume, fd, keyslot, secret)
        if volume_key is not None:
            return keyslot.id, volume_key
    raise no_keyslot_opened(volume, max_kdf_memory_kib)


def open_keyslot(volume: Luks2Volume, fd: int, keyslot: Keyslot, passphrase) -> Secret | None:
    """The volume key held by ``keyslot`` if ``passphrase`` opens it, else None."""
    if not any(keyslot.id in d.keyslots for d in volume.digests):
        return None
    with Secret(derive_key(keyslot, passphrase)) as area_key:
        return recover_volume_key(volume, fd, keyslot, area_key.value)


def recover_volume_key(volume: Luks2Volume, fd: int, keyslot: Keyslot, area_key) -> Secret | None:
    """Everything after the KDF: decrypt the keyslot area, AF-merge, check against the digest."""
    digest = next(d for d in volume.digests if keyslot.id in d.keyslots)
    material = _pread(fd, -(-keyslot.key_size * keyslot.af_stripes // SECTOR) * SECTOR,
                      volume.offset + keyslot.area_offset, f"keyslot {keyslot.id} area")
    split = _xts_decrypt(area_key, material, SECTOR, 0)
    candidate = Secret(af_merge(split, keyslot.key_size, keyslot.af_stripes, keyslot.af_hash))
    check = hashlib.pbkdf2_hmac(digest.hash, candidate.value, digest.salt, digest.iterations,
                                len(digest.digest))
    if hmac.compare_digest(check, digest.digest):
        return candidate
    candidate.wipe()
    return None


def derive_key(keyslot: Keyslot, passphrase) -> bytes:
    """Run the keyslot's KDF (the expensive part of an unlock)."""
    cost = keyslot.kdf
    if cost.type == "pbkdf2":
        return hashlib.pbkdf2_hmac(keyslot.kdf_hash, passphrase, keyslot.kdf_salt, cost.iterations,
                                   keyslot.area_key_size)
    from cryptography.hazmat.primitives.kdf import argon2  # deferred: only argon2 keyslots need it
    kdf_class = argon2.Argon2id if cost.type == "argon2id" else argon2.Argon2i
    try:
        return kdf_class(salt=keyslot.kdf_salt, length=keyslot.area_key_size, iterations=cost.time,
                         lanes=cost.threads, memory_cost=cost.memory_kib).derive(passphrase)
    except ValueError as exc:  # parameters the library refuses (read_luks2 should have caught them)
        raise ImageError(f"LUKS2 keyslot {keyslot.id} has unusable KDF parameters: {exc}") from exc
    except MemoryError as exc:
        raise PolicyError(f"not enough memory for keyslot {keyslot.id}'s KDF ({cost.describe()})") from exc


def af_merge(split: bytes, key_size: int, stripes: int, hash_name: str) -> bytearray:
    """LUKS anti-forensic merge: xor the stripes together, diffusing the running value between them
    (diffuse: each hash-sized block i becomes H(be32(i) || block), truncated to the block's size)."""
    new_hash = getattr(hashlib, hash_name)  # HASHES are all hashlib attributes; faster than hashlib.new
    size = new_hash().digest_size
    pieces = [(i.to_bytes(4, "big"), i * size, min(key_size, (i + 1) * size))
              for i in range(-(-key_size // size))]
    acc, from_bytes = bytes(key_size), int.from_bytes  # hot loop (8000 hashes): kept lean
    for s in range(stripes - 1):
        mixed = (from_bytes(acc, "little") ^ from_bytes(split[s * key_size:(s + 1) * key_size], "little")
                 ).to_bytes(key_size, "little")
        acc = b"".join([new_hash(prefix + mixed[lo:hi]).digest()[:hi - lo] for prefix, lo, hi in pieces])
    return bytearray(_xor(acc, split[(stripes - 1) * key_size:stripes * key_size]))


# ---------------------------------------------------------------------------------------------
# Data


def _xts_decrypt(key, data: bytes, sector_size: int, first_iv: int) -> bytes:
    """aes-xts-plain64 over ``data`` in sectors of ``sector_size``; IVs count 512-byte units.

    XTS done by hand over two ECB passes (IEEE 1619: P = D_K1(C ^ T) ^ T, T = E_K2(iv) * alpha^j)
    because a keyslot area is 500 sectors and one cryptography XTS context per sector would cost
    more than the rest of verify-key beyond the KDF (bench/bench_verify_key.py measures it)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    half = len(key) // 2
    if len(key) not in XTS_KEY_SIZES:
        raise ImageError("LUKS2 volume has an invalid AES-XTS key size")
    step, blocks = sector_size // SECTOR, sector_size // 16
    ivs = b"".join(((first_iv + n * step) & UINT64_MAX).to_bytes(16, "little")
                   for n in range(len(data) // sector_size))
    first_tweaks = Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor().update(ivs)
    tweaks = []
    for n in range(0, len(first_tweaks), 16):
        t = int.from_bytes(first_tweaks[n:n + 16], "little")
        for _ in range(blocks):
            tweaks.append(t.to_bytes(16, "little"))
            t <<= 1  # multiply by alpha in GF(2^128)
            if t >> 128:
                t ^= (1 << 128) | 0x87
    tweak = b"".join(tweaks)
    plain = Cipher(algorithms.AES(key[:half]), modes.ECB()).decryptor().update(_xor(data, tweak))
    return _xor(plain, tweak)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def decrypt_sectors(volume: Luks2Volume, fd: int, volume_key, first: int, count: int) -> bytes:
    """Plaintext of data sectors ``first`` .. ``first + count - 1`` (in the segment's sector size)."""
    seg = volume.segment
    if first < 0 or count < 0 or first + count > seg.sectors:
        raise ImageError(f"sectors {first}..{first + count - 1} are outside the data segment "
                         f"({seg.sectors} sectors of {seg.sector_size} bytes)")
    key = buffer(volume_key)
    data = _pread(fd, count * seg.sector_size, volume.offset + seg.offset + first * seg.sector_size,
                  "data segment")
    return _xts_decrypt(key, data, seg.sector_size,
                        seg.iv_tweak + first * seg.sector_size // SECTOR)
