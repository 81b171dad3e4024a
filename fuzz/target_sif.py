"""Target ``sif``: ``sif.read_sif`` and what ``spank-sif inspect`` and the node engine do with the image.

Input: one flag byte, then the image file. Mutations that insert or erase bytes break the header's
sizes, which the reader checks first; so the flags may ask for the header to be repaired (after the
mutation) so the descriptor table and the layout checks stay reachable:

- bit 0: descriptor table size := descriptor count x 585;
- bit 1: data section := from the end of the table (if it started before) to the end of the file.

With no flag set the bytes are the file as they are, so broken headers are fuzzed too.
"""
import json

from fuzz import harness
from fuzz.harness import check
from spank_sif import keys, sif
from spank_sif.cli import inspect

MAX_LEN = 12288
REPAIR_TABLE_SIZE, REPAIR_DATA_SECTION = 1, 2
TOKENS = [sif.MAGIC, sif.VERSION, sif.LAUNCH_SCRIPT.encode(), b"-----BEGIN MESSAGE-----",
          *(v.to_bytes(4, "little") for v in (*sif.DataType, 0xF0000001, sif.GROUP_MASK))]


def encode(image: bytes, flags: int = REPAIR_TABLE_SIZE | REPAIR_DATA_SECTION) -> bytes:
    return bytes([flags]) + image


def decode(data: bytes) -> bytes:
    """The image file an input stands for."""
    if not data:
        return b""
    flags, raw = data[0], bytearray(data[1:])
    if len(raw) >= sif.HEADER.size:
        f = list(sif.HEADER.unpack_from(raw))  # 8: count, 9: table offset, 10: table size, 11/12: data
        if flags & REPAIR_TABLE_SIZE and 0 <= f[8] <= sif.MAX_DESCRIPTORS:
            f[10] = f[8] * sif.DESCRIPTOR.size
        table_end = f[9] + f[10]
        if flags & REPAIR_DATA_SECTION and 0 <= table_end <= len(raw):
            f[11] = max(f[11], table_end) if f[11] <= len(raw) else table_end
            f[12] = len(raw) - f[11]
        sif.HEADER.pack_into(raw, 0, *f)
    return bytes(raw)


def run(data: bytes) -> str:
    raw = decode(data)
    fd = harness.scratch_file(raw)
    return harness.outcome(lambda: _use(fd, len(raw)))


def _use(fd: int, size: int) -> None:
    image = sif.read_sif(fd, name="fuzz.sif")
    _check_image(image, size)
    json.dumps(image.to_dict())          # inspect --json
    inspect.render(image)                # inspect
    part = image.primary_partition()     # the node engine, then keys.luks_passphrase
    for message in image.crypto_messages(part):
        check(message.type == sif.DataType.CRYPTO_MESSAGE and message.linked_id == part.id,
              "crypto_messages returned an object not linked to the partition")
        check(len(image.read_object(fd, message, keys.MAX_MESSAGE)) == message.size, "short object read")


def _check_image(image: sif.SifImage, size: int) -> None:
    """What the reader promises about an image it accepts, checked independently of its code."""
    h = image.header
    check(image.file_size == size, "file size")
    check(sif.HEADER.size <= h.descriptors_offset
          and h.descriptors_offset + h.descriptors_size <= h.data_offset
          and h.data_offset + h.data_size <= size, "header layout")
    ids = [d.id for d in image.descriptors]
    check(len(ids) == len(set(ids)) and all(0 < i < sif.GROUP_MASK for i in ids), "object ids")
    spans = sorted((d.offset, d.end) for d in image.descriptors if d.size)
    reserved = [(0, sif.HEADER.size), (h.descriptors_offset, h.descriptors_offset + h.descriptors_size)]
    check(all(0 <= a < b <= size for a, b in spans), "object outside the file")
    check(all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False)), "objects overlap")
    check(not any(a < e and s < b for a, b in spans for s, e in reserved), "object over header or table")
