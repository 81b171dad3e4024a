"""LUKS2 in userspace: headers, metadata validation, the KDF caps, and sector decryption.

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

Keys are checked and volumes activated by libcryptsetup (``libcryptsetup.py``), on a snapshot of
the bytes ``header_ranges`` names; this module validates the metadata libcryptsetup chose and
decides, before any key derivation runs, which keyslots the site's caps let run
(``affordable_keyslots``) and what to say when none opens (``no_keyslot_opened``).
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
from spank_sif.secret import buffer

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
# libcryptsetup reads key_size x 4000 bytes of keyslot material whatever af.stripes says.
LUKS_STRIPES = 4000
# Where libcryptsetup looks for header copies: a binary header names any size in this range.
HEADER_SIZE_MIN, HEADER_SIZE_MAX = HEADER_SIZES[0], HEADER_SIZES[-1]
# cryptsetup's limits (lib/crypto_backend/pbkdf_check.c); anything beyond is not a cryptsetup volume.
ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024
ARGON2_MAX_THREADS = 16
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
PRIORITY_IGNORE, PRIORITY_NORMAL, PRIORITY_PREFER = 0, 1, 2
SECTOR = 512  # keyslot areas and IVs count in 512-byte units whatever the data sector size


class KdfCost(NamedTuple):
    """What running a keyslot's KDF costs: the site's caps are checked against this before running it.

    Argon2 keyslots have ``memory_kib``, ``time`` (passes) and ``threads``; PBKDF2 keyslots have
    ``iterations`` (and no memory to speak of)."""

    type: str
    memory_kib: int = 0
    time: int = 0
    iterations: int = 0
    threads: int = 1

    @property
    def memory_hard(self) -> bool:
        return self.type != "pbkdf2"

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
    keyslots: tuple  # of Keyslot, in the metadata's order
    segment: Segment
    digests: tuple  # of Digest, in the metadata's order


# ---------------------------------------------------------------------------------------------
# Reading the headers


def _pread(fd: int, length: int, offset: int, what: str) -> bytes:
    return read_exact(fd, length, offset, f"the LUKS2 {what}")


def _check_size(offset: int, size: int) -> None:
    if offset < 0 or size < 2 * HEADER_SIZES[0]:
        raise ImageError(f"LUKS2 volume of {size} bytes is too small to hold its two headers")


def read_luks2(fd: int, offset: int = 0, size: int | None = None) -> Luks2Volume:
    """Read, checksum-verify and validate the LUKS2 volume of ``size`` bytes at ``offset`` in ``fd``.

    The newer valid copy wins, the primary on a tie. (libcryptsetup also drops a copy whose
    metadata it finds invalid, and its choice is the one that counts: ``libcryptsetup.Header``.)"""
    if size is None:
        try:
            size = os.fstat(fd).st_size - offset
        except OSError as exc:
            raise ImageError(f"cannot stat the image: {exc.strerror}") from exc
    problems: list[str] = []
    copies = header_copies(fd, offset, size, problems)
    if not copies:
        raise ImageError(problems[0] if problems else "no LUKS2 header found")
    name, fields, metadata = max(copies, key=lambda c: (c[1]["seqid"], c[0] == "primary"))
    return validate(fields, metadata, name, offset, size)


def header_copies(fd: int, offset: int, size: int, problems: list | None = None) -> list:
    """The header copies whose binary header, checksum and JSON text are sound, as
    ``(name, binary fields, JSON dict)``; what is wrong with the others goes to ``problems``."""
    _check_size(offset, size)
    problems = [] if problems is None else problems
    copies: list = []
    primary = _read_copy(fd, offset, size, 0, MAGIC_PRIMARY, problems)
    if primary:
        copies.append(("primary", *primary))
    # The secondary sits right after the primary; if the primary is unreadable, look where it may be.
    for where in ((primary[0]["hdr_size"],) if primary else HEADER_SIZES):
        secondary = _read_copy(fd, offset, size, where, MAGIC_SECONDARY, problems if primary else [])
        if secondary:
            copies.append(("secondary", *secondary))
            break
    return copies


def header_ranges(fd: int, offset: int, size: int) -> list:
    """Every part of the volume libcryptsetup may read to choose a header copy, as merged
    ``(start, length)`` ranges relative to the volume: the binary header at each place a copy can
    start (0, every allowed header size, the size the primary names) and the whole of each copy
    whose binary header has the right magic and a size libcryptsetup would read. At most 8 MiB and
    a few KiB whatever the headers claim."""
    _check_size(offset, size)
    ranges = []

    def binary(at: int) -> bytes:
        if at + BINARY_HEADER_SIZE > size:
            return b""
        ranges.append((at, BINARY_HEADER_SIZE))
        return _pread(fd, BINARY_HEADER_SIZE, offset + at, "header")

    places = set(HEADER_SIZES)
    raw = binary(0)
    named = int.from_bytes(raw[8:16], "big")
    if raw[:6] == MAGIC_PRIMARY and HEADER_SIZE_MIN <= named <= HEADER_SIZE_MAX:
        ranges.append((0, min(named, size)))
        places.add(named)
    for at in sorted(places):
        raw = binary(at)
        if raw[:6] == MAGIC_SECONDARY and int.from_bytes(raw[8:16], "big") == at:
            ranges.append((at, min(at, size - at)))
    return _merge(ranges)


def _merge(ranges: list) -> list:
    merged: list = []
    for start, length in sorted(ranges):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            last_start, last_length = merged[-1]
            merged[-1] = (last_start, max(last_length, start + length - last_start))
        else:
            merged.append((start, length))
    return merged


def keyslot_material(keyslot: "Keyslot") -> tuple:
    """``(offset, length)`` in the volume of the encrypted key material libcryptsetup reads to
    open ``keyslot``."""
    return keyslot.area_offset, -(-keyslot.key_size * LUKS_STRIPES // SECTOR) * SECTOR


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


def validate(fields: dict, metadata: dict, copy: str, offset: int, size: int) -> Luks2Volume:
    """The volume a header copy describes (its binary ``fields`` and JSON ``metadata``), every
    value checked; ``copy`` names it ("primary", "secondary")."""
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
    # In the metadata's order, which is the order libcryptsetup walks them in.
    digests = tuple(_digest(i, d) for i, d in _ids(_field(metadata, "digests", ""), "digests",
                                                   MAX_KEYSLOTS).items())
    keyslots = tuple(_keyslot(i, k, keyslots_end, hdr_size)
                     for i, k in _ids(_field(metadata, "keyslots", ""), "keyslots", MAX_KEYSLOTS).items())
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
# Which keyslots a passphrase is tried against, and which of them the site's caps let run


def digest_of(volume: Luks2Volume, keyslot: Keyslot) -> Digest | None:
    """The digest that checks the key ``keyslot`` holds: the first one listing it, as libcryptsetup
    looks it up."""
    return next((d for d in volume.digests if keyslot.id in d.keyslots), None)


def keyslot_order(volume: Luks2Volume) -> list:
    """Keyslots a passphrase is tried against, as libcryptsetup tries them: those whose digest
    covers the data segment, "prefer" (2) before "normal" (1), "ignore" (0) never; in the
    metadata's order within one priority."""
    bound = [k for k in volume.keyslots
             if k.priority != PRIORITY_IGNORE and (d := digest_of(volume, k)) is not None and 0 in d.segments]
    return sorted(bound, key=lambda k: -k.priority)  # stable: the metadata's order within a priority


class KdfCaps(NamedTuple):
    """The site's limits on what a key derivation may cost (None: no limit), checked before any
    derivation runs. The config keys are named in the messages."""

    memory_kib: int | None = None         # Argon2 memory
    time_cost: int | None = None          # Argon2 passes
    threads: int | None = None            # Argon2 threads (lanes)
    pbkdf2_iterations: int | None = None  # PBKDF2 keyslots and the volume-key digest


NO_CAPS = KdfCaps()


def site_caps(config) -> KdfCaps:
    """The caps of a site configuration (``config.SiteConfig``)."""
    return KdfCaps(config.kdf_max_memory_kib, config.kdf_max_time_cost, config.kdf_max_threads,
                   config.kdf_max_pbkdf2_iterations)


# The one place that decides which keyslots may run, and what to say when none opened: verify-key
# (as the user) and the node engine (as root) must accept exactly the same keys.

WRONG_KEY = ("no keyslot of the image accepts this key: check the passphrase or PEM key (is it the "
             "key this image was built with?)")

# What each cap limits: (field of KdfCost, field of KdfCaps, config key, the cost in words, the
# cap in words, how to rebuild the image).
_LIMITS = (
    ("memory_kib", "memory_kib", "kdf_max_memory_kib", "{} KiB of memory", "{} KiB", "a smaller --pbkdf-memory"),
    ("time", "time_cost", "kdf_max_time_cost", "{} passes", "{} passes",
     "a smaller --pbkdf-force-iterations or --iter-time"),
    ("threads", "threads", "kdf_max_threads", "{} threads", "{}", "a smaller --pbkdf-parallel"),
    ("iterations", "pbkdf2_iterations", "kdf_max_pbkdf2_iterations", "{} PBKDF2 iterations", "{}",
     "a smaller --iter-time or --pbkdf-force-iterations"),
)


def _excess(keyslot: Keyslot, caps: KdfCaps) -> str:
    """Why ``keyslot``'s KDF is above the caps ("" if it is not), as a message."""
    for field, cap_field, key, cost_words, cap_words, rebuild in _LIMITS:
        value, cap = getattr(keyslot.kdf, field), getattr(caps, cap_field)
        if cap is not None and value > cap:
            return (f"the image's key derivation (keyslot {keyslot.id}: {keyslot.kdf.describe()}) needs "
                    f"{cost_words.format(value)}, above this site's limit of {cap_words.format(cap)} ({key}): "
                    f"rebuild the image with {rebuild} or ask your admin")
    return ""


def _digest_excess(volume: Luks2Volume, keyslots: list, caps: KdfCaps) -> str:
    cap = caps.pbkdf2_iterations
    for digest in dict.fromkeys(digest_of(volume, k) for k in keyslots):
        if cap is not None and digest is not None and digest.iterations > cap:
            return (f"the image's volume-key digest {digest.id} needs {digest.iterations} PBKDF2 iterations, "
                    f"above this site's limit of {cap} (kdf_max_pbkdf2_iterations): rebuild the image "
                    "(cryptsetup luksFormat) or ask your admin")
    return ""


def affordable_keyslots(volume: Luks2Volume, caps: KdfCaps) -> list:
    """The keyslots to try, in libcryptsetup's order, whose costs all fit the site's caps: Argon2
    memory, passes and threads, PBKDF2 iterations, and the iterations of the digest that checks
    the key they hold (``NO_CAPS``: tools that study volumes).

    Decided before any derivation runs: raises PolicyError if no keyslot fits, UnsupportedImageError
    if the volume has no usable keyslot at all."""
    candidates = keyslot_order(volume)
    if not candidates:
        raise UnsupportedImageError("the image's LUKS2 volume has no usable keyslot (all removed or "
                                    "ignored): it cannot be opened")
    allowed = [k for k in candidates if not _excess(k, caps) and not _digest_excess(volume, [k], caps)]
    if not allowed:
        raise PolicyError(_excess(candidates[0], caps) or _digest_excess(volume, candidates, caps))
    return allowed


def no_keyslot_opened(volume: Luks2Volume, caps: KdfCaps) -> SifError:
    """The error once every affordable keyslot refused the key: a wrong key, unless a keyslot was
    skipped for its cost (then the key might open that one, and the cap is the reason)."""
    allowed = affordable_keyslots(volume, caps)
    skipped = [k for k in keyslot_order(volume) if k not in allowed]
    if skipped:
        reason = _excess(skipped[0], caps) or _digest_excess(volume, skipped[:1], caps)
        return PolicyError(f"no keyslot within the caps accepts this key; {reason}")
    return WrongKeyError(WRONG_KEY)


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
