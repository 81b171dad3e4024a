"""SIF, the Singularity/Apptainer image format: read, validate and write.

An image is a 128-byte global header, a table of 585-byte descriptors and the data objects they
point at (all little-endian). The reader takes an already-open file descriptor and reads only the
header and the table, with ``os.pread``; it never follows a path. Everything it reads is checked
before it is believed, so a hostile image ends in an ``ImageError`` naming what is wrong and where,
never in a large allocation, a read past the end of the file or another exception.

The writer lays images out as sif v2.1+ (SingularityCE >= 3.9, Apptainer >= 1.0) does: launch
script, descriptor table at 4096, data right after the table, partitions aligned to 4 KiB.

Format facts and their upstream sources: docs/formats.md, "SIF".
"""
import enum
import os
import stat
import struct
import time
from collections.abc import Callable
from itertools import pairwise
from typing import NamedTuple

from spank_sif.errors import ImageError, UnsupportedImageError
from spank_sif.fdio import read_exact

HEADER = struct.Struct("<32s10s3s3s16sqqqqqqqq")
DESCRIPTOR = struct.Struct("<i?IIIqqqqqqq128s384s")
assert HEADER.size == 128 and DESCRIPTOR.size == 585

MAGIC = b"SIF_MAGIC\0"
VERSION = b"01\0"
LAUNCH_SCRIPT = "#!/usr/bin/env run-singularity\n"
GROUP_MASK = 0xF0000000          # stored group IDs and group links carry these bits
MAX_DESCRIPTORS = 1 << 16        # real images have 48; this only bounds what a hostile header can ask
GO_ZERO_TIME = -62135596800      # Go's zero time.Time, stored by deterministic builds: "not set"
PARTITION_ALIGNMENT = 4096
DEFAULT_DESCRIPTORS = 48
DEFAULT_DESCRIPTORS_OFFSET = 4096


class _Code(enum.IntEnum):
    """An on-disk code. ``label`` is its name for people (``encrypted-squashfs``)."""

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class DataType(_Code):
    DEFFILE = 0x4001
    ENV_VAR = 0x4002
    LABELS = 0x4003
    PARTITION = 0x4004
    SIGNATURE = 0x4005
    GENERIC_JSON = 0x4006
    GENERIC = 0x4007
    CRYPTO_MESSAGE = 0x4008
    SBOM = 0x4009               # sif v2 only, like the two below
    OCI_ROOT_INDEX = 0x400A
    OCI_BLOB = 0x400B


class FsType(_Code):
    SQUASHFS = 1
    EXT3 = 2
    ARCHIVE = 3                 # "ImmuObj"
    RAW = 4
    ENCRYPTED_SQUASHFS = 5      # LUKS2 volume holding a squashfs (dm-crypt)
    GOCRYPTFS_SQUASHFS = 6      # Apptainer >= 1.2 unprivileged encryption; not LUKS


class PartType(_Code):
    SYSTEM = 1
    PRIMSYS = 2                 # the primary root file system, at most one per image
    DATA = 3
    OVERLAY = 4


class HashType(_Code):
    SHA256 = 1
    SHA384 = 2
    SHA512 = 3
    BLAKE2S = 4
    BLAKE2B = 5


class FormatType(_Code):
    OPENPGP = 1
    PEM = 2


class MessageType(_Code):
    CLEAR_SIGNATURE = 0x100     # OpenPGP
    RSA_OAEP = 0x200            # PEM: the wrapped LUKS key


class SbomFormat(_Code):
    CYCLONEDX_JSON = 1
    CYCLONEDX_XML = 2
    GITHUB_JSON = 3
    SPDX_JSON = 4
    SPDX_RDF = 5
    SPDX_TAG_VALUE = 6
    SPDX_YAML = 7
    SYFT_JSON = 8


ARCH_CODES = {
    "00": "unknown", "01": "386", "02": "amd64", "03": "arm", "04": "arm64", "05": "ppc64",
    "06": "ppc64le", "07": "mips", "08": "mipsle", "09": "mips64", "10": "mips64le", "11": "s390x",
    "12": "riscv64", "13": "loong64",
}
ARCH_BY_NAME = {name: code for code, name in ARCH_CODES.items()}


def code(enum_type, value: int):
    """``value`` as a member of ``enum_type``, or the plain int when the code is unknown."""
    try:
        return enum_type(value)
    except ValueError:
        return value


def label(value) -> str:
    """The people's name of a code: ``squashfs``, or ``unknown(9)`` for a code we do not know."""
    return value.label if isinstance(value, _Code) else f"unknown({value})"


def arch_name(raw: bytes) -> str:
    """``amd64`` for the 3-byte code ``02\\0``; ``unknown`` for anything else, as the reference does."""
    if len(raw) == 3 and raw[2] == 0:
        return ARCH_CODES.get(raw[:2].decode("ascii", "replace"), "unknown")
    return "unknown"


def _text(raw: bytes) -> str:
    # Trailing NULs are padding; bytes that are not UTF-8 stay visible as \x escapes.
    return raw.rstrip(b"\0").decode("utf-8", "backslashreplace")


def format_time(seconds: int) -> str | None:
    """ISO 8601 UTC, or None for "not set" (Go's zero time) and values no calendar can show."""
    if seconds == GO_ZERO_TIME:
        return None
    import datetime  # here: only inspect shows times, and every command pays its imports at start-up
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


class Header(NamedTuple):
    """The global header, field by field (sif v2 names)."""

    launch_script: str
    magic: bytes
    version: bytes
    arch_code: bytes
    id: bytes
    created_at: int
    modified_at: int
    descriptors_free: int
    descriptors_total: int
    descriptors_offset: int
    descriptors_size: int
    data_offset: int
    data_size: int

    @property
    def arch(self) -> str:
        return arch_name(self.arch_code)

    @property
    def uuid(self) -> str:
        h = self.id.hex()  # as uuid.UUID(bytes=...) prints it, without importing uuid
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def to_dict(self) -> dict:
        return {
            "launch_script": self.launch_script, "version": _text(self.version), "arch": self.arch,
            "id": self.uuid, "created_at": self.created_at, "modified_at": self.modified_at,
            "descriptors_free": self.descriptors_free, "descriptors_total": self.descriptors_total,
            "descriptors_offset": self.descriptors_offset, "descriptors_size": self.descriptors_size,
            "data_offset": self.data_offset, "data_size": self.data_size,
        }


class Descriptor(NamedTuple):
    """One used descriptor, field by field. ``group_id`` and ``linked_id`` are the stored values;
    ``group``, ``link`` and ``link_is_group`` decode them. ``table_index`` is the slot in the table."""

    table_index: int
    data_type: int
    used: bool
    id: int
    group_id: int
    linked_id: int
    offset: int
    size: int
    size_with_padding: int
    created_at: int
    modified_at: int
    uid: int
    gid: int
    name: str
    extra: bytes

    @property
    def type(self):
        return code(DataType, self.data_type)

    @property
    def group(self) -> int:
        """The object group, 0 for none."""
        return self.group_id & ~GROUP_MASK

    @property
    def link(self) -> int:
        """The linked object or group ID, 0 for none."""
        return self.linked_id & ~GROUP_MASK

    @property
    def link_is_group(self) -> bool:
        return self.linked_id & GROUP_MASK == GROUP_MASK

    @property
    def end(self) -> int:
        return self.offset + self.size

    def _int(self, at: int) -> int:
        return struct.unpack_from("<i", self.extra, at)[0]

    def _only(self, data_type: DataType) -> bool:
        return self.data_type == data_type

    # Extra, decoded by data type (None when this descriptor's type does not carry the field).
    @property
    def fs_type(self):
        return code(FsType, self._int(0)) if self._only(DataType.PARTITION) else None

    @property
    def part_type(self):
        return code(PartType, self._int(4)) if self._only(DataType.PARTITION) else None

    @property
    def arch(self) -> str | None:
        return arch_name(self.extra[8:11]) if self._only(DataType.PARTITION) else None

    @property
    def hash_type(self):
        return code(HashType, self._int(0)) if self._only(DataType.SIGNATURE) else None

    @property
    def entity(self) -> bytes | None:
        """The signing key's fingerprint (20 bytes), None when absent."""
        fingerprint = self.extra[4:24]
        return fingerprint if self._only(DataType.SIGNATURE) and any(fingerprint) else None

    @property
    def crypto_format(self):
        return code(FormatType, self._int(0)) if self._only(DataType.CRYPTO_MESSAGE) else None

    @property
    def crypto_message_type(self):
        return code(MessageType, self._int(4)) if self._only(DataType.CRYPTO_MESSAGE) else None

    @property
    def sbom_format(self):
        return code(SbomFormat, self._int(0)) if self._only(DataType.SBOM) else None

    @property
    def digest(self) -> str | None:
        """``sha256:<hex>`` of an OCI root index or blob."""
        if self.data_type in (DataType.OCI_ROOT_INDEX, DataType.OCI_BLOB):
            return self.extra.split(b"\0", 1)[0].decode("ascii", "backslashreplace")
        return None

    @property
    def is_pem_rsa_oaep(self) -> bool:
        return (self.crypto_format, self.crypto_message_type) == (FormatType.PEM, MessageType.RSA_OAEP)

    def to_dict(self) -> dict:
        d = {
            "id": self.id, "index": self.table_index, "type": label(self.type), "type_code": self.data_type,
            "group": self.group, "link": self.link, "link_is_group": self.link_is_group,
            "offset": self.offset, "size": self.size, "size_with_padding": self.size_with_padding,
            "created_at": self.created_at, "modified_at": self.modified_at, "uid": self.uid,
            "gid": self.gid, "name": self.name,
        }
        for field in ("fs_type", "part_type", "hash_type", "crypto_format", "crypto_message_type",
                      "sbom_format"):
            value = getattr(self, field)
            if value is not None:
                d[field], d[field + "_code"] = label(value), int(value)
        for field in ("arch", "digest"):
            if getattr(self, field) is not None:
                d[field] = getattr(self, field)
        if self.entity is not None:
            d["entity"] = self.entity.hex().upper()
        return d


class SifImage(NamedTuple):
    """A validated image: its header, its used descriptors in table order, the file's size."""

    name: str
    file_size: int
    header: Header
    descriptors: tuple[Descriptor, ...]

    def by_id(self, object_id: int) -> Descriptor | None:
        return next((d for d in self.descriptors if d.id == object_id), None)

    def primary_partition(self) -> Descriptor:
        """The primary system partition, if spank-sif can run it (squashfs, plain or in LUKS2)."""
        found = [d for d in self.descriptors if d.type == DataType.PARTITION and d.part_type == PartType.PRIMSYS]
        if not found:
            raise UnsupportedImageError(
                f"{self.name}: no primary system partition (a partition of type primsys): "
                "there is no container file system to run")
        if len(found) > 1:
            ids = ", ".join(str(d.id) for d in found)
            raise UnsupportedImageError(
                f"{self.name}: {len(found)} primary system partitions (ids {ids}) where there may be "
                "only one: the image is malformed, rebuild it")
        part = found[0]
        if part.fs_type == FsType.GOCRYPTFS_SQUASHFS:
            raise UnsupportedImageError(
                f"{self.name}: the primary partition (id {part.id}) is gocryptfs-encrypted, as "
                "unprivileged Apptainer >= 1.2 builds make it; spank-sif runs LUKS2-encrypted images: "
                "rebuild it as root with 'apptainer build --encrypt'")
        if part.fs_type not in (FsType.SQUASHFS, FsType.ENCRYPTED_SQUASHFS):
            raise UnsupportedImageError(
                f"{self.name}: the primary partition (id {part.id}) holds a {label(part.fs_type)} "
                "file system; spank-sif runs squashfs and LUKS2-encrypted squashfs partitions only")
        if part.size == 0:  # to a loop device, size 0 means "to the end of the file"
            raise UnsupportedImageError(f"{self.name}: the primary partition (id {part.id}) is empty "
                                        "(0 bytes): the image is damaged, rebuild it")
        return part

    def crypto_messages(self, part: Descriptor) -> list[Descriptor]:
        """Crypto messages linked to ``part`` (object links only), PEM + RSA-OAEP ones first, as
        Apptainer looks them up; otherwise in table order."""
        linked = [d for d in self.descriptors
                  if d.type == DataType.CRYPTO_MESSAGE and d.linked_id == part.id]
        return sorted(linked, key=lambda d: not d.is_pem_rsa_oaep)

    def read_object(self, fd: int, desc: Descriptor, limit: int) -> bytes:
        """The data of ``desc``, refused when it is larger than ``limit`` bytes."""
        what = f"object id {desc.id} ({label(desc.type)})"
        if desc.size > limit:
            raise ImageError(f"{self.name}: {what} is {desc.size} bytes, more than the {limit} bytes "
                             "such an object may have: the image is corrupt or not what it claims")
        return _pread(fd, desc.size, desc.offset, self.name, what)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "file_size": self.file_size, "header": self.header.to_dict(),
            "descriptors": [d.to_dict() for d in self.descriptors],
        }


# ---------------------------------------------------------------------------------------------
# Reading


def _pread(fd: int, length: int, offset: int, name: str, what: str) -> bytes:
    return read_exact(fd, length, offset, f"{what} of {name}")


def _file_size(fd: int, name: str) -> int:
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
    except OSError as err:
        raise ImageError(f"{name}: cannot read the image: {err.strerror}") from err
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    raise ImageError(f"{name}: is {kind}, not a SIF image")


def read_sif(fd: int, size: int | None = None, *, name: str = "image") -> SifImage:
    """Read and validate the header and descriptor table of the image open on ``fd``.

    ``size`` is the file's size (default: from ``fstat``); ``name`` only labels error messages.
    Raises ``ImageError`` with one line saying what is wrong and where.
    """
    if size is None:
        size = _file_size(fd, name)
    if size < HEADER.size:
        what = "empty" if size == 0 else f"only {size} bytes long"
        raise ImageError(f"{name}: the file is {what}, too short for a SIF image (the global header "
                         f"alone is {HEADER.size} bytes): not a SIF image, or truncated")
    header = _parse_header(_pread(fd, HEADER.size, 0, name, "the global header"), size, name)
    table = _pread(fd, header.descriptors_size, header.descriptors_offset, name, "the descriptor table")
    descriptors = tuple(_parse_descriptors(table, header, size, name))
    _check_layout(descriptors, header, size, name)
    return SifImage(name=name, file_size=size, header=header, descriptors=descriptors)


def _parse_header(raw: bytes, size: int, name: str) -> Header:
    launch, magic, version, arch, image_id, *numbers = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ImageError(f"{name}: not a SIF image (no SIF_MAGIC at byte 32)")
    if version != VERSION:
        shown = version.rstrip(b"\0").decode("ascii", "backslashreplace")
        raise ImageError(f"{name}: SIF version {shown!r} is not supported (only version 01 exists)")
    h = Header(_text(launch), magic, version, arch, image_id, *numbers)

    def bad(message):
        return ImageError(f"{name}: global header: {message}: the image is corrupt or truncated")

    total, offset = h.descriptors_total, h.descriptors_offset
    if not 0 <= total <= MAX_DESCRIPTORS:
        raise bad(f"descriptor count {total} is outside 0..{MAX_DESCRIPTORS}")
    if not 0 <= h.descriptors_free <= total:
        raise bad(f"free descriptor count {h.descriptors_free} is outside 0..{total}")
    if h.descriptors_size != total * DESCRIPTOR.size:
        raise bad(f"descriptor table size {h.descriptors_size} is not {total} x {DESCRIPTOR.size} bytes")
    if offset < HEADER.size:
        raise bad(f"descriptor table offset {offset} lies inside the {HEADER.size}-byte header")
    table_end = offset + h.descriptors_size
    if table_end > size:
        raise bad(f"descriptor table [{offset}, {table_end}) extends past the end of the file "
                  f"({size} bytes)")
    if h.data_offset < table_end:
        raise bad(f"data section offset {h.data_offset} lies before the end of the descriptor table "
                  f"[{offset}, {table_end})")
    if h.data_size < 0:
        raise bad(f"data section size {h.data_size} is negative")
    if h.data_offset + h.data_size > size:
        raise bad(f"data section [{h.data_offset}, {h.data_offset + h.data_size}) extends past the "
                  f"end of the file ({size} bytes)")
    return h


def _parse_descriptors(table: bytes, header: Header, size: int, name: str):
    seen = set()
    for index in range(header.descriptors_total):
        fields = DESCRIPTOR.unpack_from(table, index * DESCRIPTOR.size)
        if not fields[1]:       # unused slot: its other fields mean nothing
            continue
        d = Descriptor(index, *fields[:12], _text(fields[12]), fields[13])  # type: ignore[call-arg]
        where = f"{name}: descriptor {index + 1} (id {d.id})"
        if d.id == 0 or d.id & GROUP_MASK:
            raise ImageError(f"{where}: object ID {d.id} is not valid (1..{GROUP_MASK - 1}): "
                             "the image is corrupt")
        if d.id in seen:
            raise ImageError(f"{where}: object ID {d.id} is used twice: the image is corrupt")
        seen.add(d.id)
        if d.offset < 0 or d.size < 0 or d.size_with_padding < 0:
            raise ImageError(f"{where}: negative offset or size (offset {d.offset}, size {d.size}, "
                             f"with padding {d.size_with_padding}): the image is corrupt")
        if d.end > size:
            raise ImageError(f"{where} data [{d.offset}, {d.end}) extends past the end of the file "
                             f"({size} bytes): the image is truncated or corrupt")
        yield d


def _check_layout(descriptors, header: Header, size: int, name: str) -> None:
    """No object may overlap the header, the descriptor table or another object."""
    reserved = [("the global header", 0, HEADER.size),
                ("the descriptor table", header.descriptors_offset,
                 header.descriptors_offset + header.descriptors_size)]
    objects = sorted((d for d in descriptors if d.size), key=lambda d: d.offset)
    for d in objects:
        for what, start, end in reserved:
            if d.offset < end and start < d.end:
                raise ImageError(f"{name}: descriptor {d.table_index + 1} (id {d.id}) data [{d.offset}, {d.end}) "
                                 f"overlaps {what} [{start}, {end}): the image is corrupt")
    for a, b in pairwise(objects):
        if b.offset < a.end:
            raise ImageError(f"{name}: descriptor {a.table_index + 1} (id {a.id}) data [{a.offset}, {a.end}) "
                             f"overlaps descriptor {b.table_index + 1} (id {b.id}) data [{b.offset}, {b.end}): "
                             "the image is corrupt")


def open_image(path: str) -> int:
    """Open ``path`` read-only for ``read_sif`` (the CLI's convenience; the node engine opens
    images as the job's user instead). The caller closes the fd."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise ImageError(f"{path}: cannot open the image: {err.strerror}") from err


# ---------------------------------------------------------------------------------------------
# Writing


class SifObject(NamedTuple):
    """A data object to write: ``data`` is bytes, the path of a file whose content is copied, or a
    function ``fill(fd, offset) -> size`` that writes the content itself (streaming writers)."""

    data_type: DataType
    data: bytes | str | os.PathLike | Callable[[int, int], int]
    group: int = 1                  # 0: no group
    link: int = 0                   # object ID (or group ID with link_is_group); 0: none
    link_is_group: bool = False
    name: str = ""
    extra: bytes = b""
    alignment: int = 0              # 0: 4 KiB for partitions, none for the rest (as sif v2.1+)

    @classmethod
    def partition(cls, data, fs_type: FsType, part_type: PartType = PartType.PRIMSYS,
                  arch: str = "amd64", **kw) -> "SifObject":
        extra = struct.pack("<ii3s", fs_type, part_type, ARCH_BY_NAME[arch].encode() + b"\0")
        return cls(DataType.PARTITION, data, extra=extra, **kw)

    @classmethod
    def crypto_message(cls, data, link: int, format_type: FormatType = FormatType.PEM,
                       message_type: MessageType = MessageType.RSA_OAEP, **kw) -> "SifObject":
        return cls(DataType.CRYPTO_MESSAGE, data, link=link,
                   extra=struct.pack("<ii", format_type, message_type), **kw)


def apptainer_layout(partition, fs_type: FsType = FsType.ENCRYPTED_SQUASHFS, arch: str = "amd64",
                     deffile=None, json_objects: dict | None = None, crypto_message=None) -> list:
    """The objects of an image as Apptainer's builder makes it: definition file, JSON objects in
    name order, the primary partition, and in PEM mode the crypto message linked to the partition
    (all in group 1)."""
    objects = [SifObject(DataType.DEFFILE, deffile)] if deffile is not None else []
    objects += [SifObject(DataType.GENERIC_JSON, data, name=name)
                for name, data in sorted((json_objects or {}).items())]
    objects.append(SifObject.partition(partition, fs_type, PartType.PRIMSYS, arch))
    if crypto_message is not None:
        objects.append(SifObject.crypto_message(crypto_message, link=len(objects)))
    return objects


def write_sif(target, objects, *, launch_script: str = LAUNCH_SCRIPT, image_id: bytes | None = None,
              created_at: int | None = None, descriptors_total: int = DEFAULT_DESCRIPTORS,
              descriptors_offset: int = DEFAULT_DESCRIPTORS_OFFSET) -> SifImage:
    """Write ``objects`` (``SifObject``) as a SIF image to ``target`` (a path, created or replaced,
    or a writable fd, truncated). Object IDs are 1, 2, ... in list order. Returns the image as
    ``read_sif`` reads it back. Misuse (too many objects, a name too long) raises ValueError."""
    objects = list(objects)
    if len(objects) > descriptors_total:
        raise ValueError(f"{len(objects)} objects do not fit in {descriptors_total} descriptors")
    if len(launch_script.encode()) >= 32:
        raise ValueError("the launch script must be shorter than 32 bytes")
    import uuid
    now = int(time.time()) if created_at is None else created_at
    fd = target if isinstance(target, int) else os.open(
        target, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o755)
    try:
        os.ftruncate(fd, 0)
        data_offset = descriptors_offset + descriptors_total * DESCRIPTOR.size
        end, table, arch = data_offset, bytearray(descriptors_total * DESCRIPTOR.size), "00"
        for index, obj in enumerate(objects):
            alignment = obj.alignment or (PARTITION_ALIGNMENT if obj.data_type == DataType.PARTITION else 1)
            name, extra = obj.name.encode(), obj.extra.ljust(384, b"\0")
            if len(name) > 128 or len(extra) > 384:
                raise ValueError(f"object {index + 1}: name or extra too long")
            offset = -(-end // alignment) * alignment
            size = _write_data(fd, offset, obj.data)
            DESCRIPTOR.pack_into(
                table, index * DESCRIPTOR.size, obj.data_type, True, index + 1, obj.group | GROUP_MASK,
                obj.link | (GROUP_MASK if obj.link_is_group else 0), offset, size, offset - end + size,
                now, now, 0, 0, name, extra)
            if obj.data_type == DataType.PARTITION and struct.unpack_from("<i", extra, 4)[0] == PartType.PRIMSYS:
                arch = extra[8:10].decode("ascii", "replace")
            end = offset + size
        header = HEADER.pack(
            launch_script.encode(), MAGIC, VERSION, arch.encode() + b"\0",
            image_id if image_id is not None else uuid.uuid4().bytes, now, now,
            descriptors_total - len(objects), descriptors_total, descriptors_offset, len(table),
            data_offset, end - data_offset)
        os.pwrite(fd, header, 0)
        os.pwrite(fd, bytes(table), descriptors_offset)
        os.ftruncate(fd, end)
        return read_sif(fd, name=str(target) if not isinstance(target, int) else "image")
    finally:
        if not isinstance(target, int):
            os.close(fd)


def _write_data(fd: int, offset: int, data) -> int:
    """Write ``data`` (bytes, a file's path or a fill function) at ``offset``; returns its size.
    All-zero chunks of a file are skipped, so sparse input (a LUKS2 header area) stays sparse."""
    if callable(data):
        return data(fd, offset)
    if isinstance(data, (bytes, bytearray, memoryview)):
        _pwrite_all(fd, bytes(data), offset)
        return len(data)
    src = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size, done = os.fstat(src).st_size, 0
        while done < size:
            chunk = os.pread(src, min(1 << 20, size - done), done)
            if not chunk:
                raise ValueError(f"{data}: shrank while being copied")
            if chunk != bytes(len(chunk)):
                _pwrite_all(fd, chunk, offset + done)
            done += len(chunk)
        return size
    finally:
        os.close(src)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
