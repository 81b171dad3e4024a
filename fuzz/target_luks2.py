"""Target ``luks2``: ``luks2.read_luks2``, ``luks2.keyslot_order`` and the KDF caps (``luks2.affordable_keyslots``).

Raw bytes would almost all die at the header checksum, so an input describes the volume and the
harness lays it out, with correct checksums unless asked otherwise:

  byte 0     flags: bits 0-1 copies (0: both with the same JSON; 1: primary only; 2: secondary only;
             3: both, the secondary's JSON being what follows the first NUL of the JSON text);
             bits 2-3 checksum (sha256, sha1, sha512, or sha256 left wrong); bits 4-5 header size
             (16, 32, 64, 16 KiB); bit 6: a binary-header overlay follows; bit 7: the volume starts
             at byte 4096 of the file (as a SIF partition does), else at 0
  byte 1     sequence ids: primary in the low nibble, secondary in the high one
  bytes 2-5  volume size in bytes (big-endian); the file is that long (a hole past the headers)
  byte 6     KDF caps for affordable_keyslots: 2 ** (byte % 32) KiB of memory, and as many passes,
             threads and PBKDF2 iterations
  [442 bytes overlaying bytes 6..447 of each binary header (version to padding), if bit 6]
  the rest   the JSON metadata text

The custom mutator edits the JSON as a tree half of the time (values swapped for hostile ones,
keys dropped or added, entries duplicated) and otherwise lets libFuzzer mutate the bytes.
"""
import hashlib
import json
import random

from fuzz import harness
from fuzz.harness import check
from spank_sif import luks2
from spank_sif.errors import SifError

MAX_LEN = 16384
PREFIX = 7
OVERLAY = 448 - 6
HEADER_SIZES = (0x4000, 0x8000, 0x10000, 0x4000)
CHECKSUMS = ("sha256", "sha1", "sha512", "sha256")
CORRUPT_CHECKSUM = 3
PARTITION_OFFSET = 4096

TOKENS = [b'"keyslots"', b'"segments"', b'"digests"', b'"tokens"', b'"config"', b'"json_size"',
          b'"keyslots_size"', b'"requirements"', b'"mandatory"', b'"luks2"', b'"crypt"', b'"raw"',
          b'"luks1"', b'"pbkdf2"', b'"argon2id"', b'"argon2i"', b'"aes-xts-plain64"', b'"dynamic"',
          b'"sha256"', b'"sha1"', b'"sha512"', b'"priority"', b'"stripes"', b'"iv_tweak"',
          b'"sector_size"', b'"memory"', b'"cpus"', b'"time"', b'"iterations"', b'"salt"',
          b'"digest"', b'"area"', b'"kdf"', b'"af"', b'"key_size"', b'"offset"', b'"size"',
          b'"18446744073709551615"', b'"16777216"', b'"16744448"', b"4000", b"4194304", b"4096"]

# Values the tree mutator puts in place of a JSON value: edges of every range the parser checks.
HOSTILE = [0, 1, -1, 2, 3, 7, 8, 16, 32, 64, 511, 512, 4096, 4097, 4000, 4001, 2**31 - 1, 2**32 - 1,
           2**32, 2**63, 2**64, 4194304, 4194305, 1.0, 1e308, True, False, None, "", "0", "1", "-1",
           "00", "0x10", " 1", "1 ", "16777216", "18446744073709551615", "18446744073709551616",
           "99999999999999999999999", "dynamic", "luks2", "crypt", "pbkdf2", "argon2id", "argon2i",
           "aes-xts-plain64", "aes-cbc-essiv:sha256", "sha256", "sha1", "whirlpool", "luks1", "raw",
           "AAAAAAAAAAAAAAAAAAAAAA==", "AA", "AAA=", "!!!!", "\u0661", "\u00b2", "\uff11", [], {},
           ["0"], ["1", "0"], ["0", "0"], [0], {"0": {}}]
ID_KEYS = ["0", "1", "2", "31", "32", "999", "1000", "00", "-1", "", "a", "\u0661", "\u00b2"]
# Names the metadata may hold, optional ones included, for keys the tree mutator adds.
FIELDS = [t.strip(b'"').decode() for t in TOKENS if t.startswith(b'"')]


def encode(text: bytes, *, flags: int = 0, seqids: int = 0x11, size: int = 20 << 20, cap_exp: int = 20,
           overlay: bytes = b"") -> bytes:
    if overlay:
        flags |= 0x40
        overlay = overlay[:OVERLAY].ljust(OVERLAY, b"\0")
    return bytes([flags, seqids]) + size.to_bytes(4, "big") + bytes([cap_exp]) + overlay + text


def decode(data: bytes):
    """(file bytes, volume offset, volume size, cap) for an input."""
    head = data[:PREFIX].ljust(PREFIX, b"\0")
    flags, seqids, size, cap = head[0], head[1], int.from_bytes(head[2:6], "big"), 2 ** (head[6] % 32)
    rest = data[PREFIX:]
    overlay = None
    if flags & 0x40:
        overlay, rest = rest[:OVERLAY].ljust(OVERLAY, b"\0"), rest[OVERLAY:]
    copies, checksum, hdr_size = flags & 3, (flags >> 2) & 3, HEADER_SIZES[(flags >> 4) & 3]
    second = rest.partition(b"\0")[2]
    primary = _copy(luks2.MAGIC_PRIMARY, 0, hdr_size, seqids & 15, rest, checksum, overlay)
    secondary = _copy(luks2.MAGIC_SECONDARY, hdr_size, hdr_size, seqids >> 4,
                      second if copies == 3 else rest, checksum, overlay)
    if copies == 1:
        secondary = bytes(hdr_size)
    elif copies == 2:
        primary = bytes(hdr_size)
    offset = PARTITION_OFFSET if flags & 0x80 else 0
    return bytes(offset) + primary + secondary, offset, size, cap


def _copy(magic, where, hdr_size, seqid, text, checksum, overlay) -> bytes:
    b = bytearray(hdr_size)
    b[0:6] = magic
    b[6:8] = (2).to_bytes(2, "big")
    b[8:16] = hdr_size.to_bytes(8, "big")
    b[16:24] = seqid.to_bytes(8, "big")
    b[72:72 + len(CHECKSUMS[checksum])] = CHECKSUMS[checksum].encode()
    b[168:204] = b"0d6f3bc2-6e9a-4f3e-9b61-1a3c7e0b2f4d"
    b[256:264] = where.to_bytes(8, "big")
    if overlay is not None:
        b[6:448] = overlay
    text = text[:hdr_size - 4096]
    b[4096:4096 + len(text)] = text
    alg = luks2._cstring(b[72:104])
    if alg in luks2.CHECKSUM_ALGORITHMS:
        digest = hashlib.new(alg, b).digest()  # the checksum field is still zero here
        if checksum == CORRUPT_CHECKSUM:
            digest = bytes([digest[0] ^ 1]) + digest[1:]
        b[448:448 + len(digest)] = digest
    return bytes(b)


def run(data: bytes) -> str:
    raw, offset, size, cap = decode(data)
    fd = harness.scratch_file(raw[:offset + size], offset + size)
    return harness.outcome(lambda: _use(fd, offset, size, cap))


def _use(fd: int, offset: int, size: int, cap: int) -> None:
    volume = luks2.read_luks2(fd, offset, size)
    _check_volume(volume, size)
    order = luks2.keyslot_order(volume)
    bound = {k for d in volume.digests if 0 in d.segments for k in d.keyslots}
    check(all(k.id in bound and k.priority != luks2.PRIORITY_IGNORE for k in order), "keyslot order")
    check([k.priority for k in order] == sorted((k.priority for k in order), reverse=True), "priorities")
    caps = luks2.KdfCaps(memory_kib=cap, time_cost=cap, threads=cap, pbkdf2_iterations=cap)
    slots = luks2.affordable_keyslots(volume, caps)
    check(bool(slots) and all(max(k.kdf.memory_kib, k.kdf.time, k.kdf.threads, k.kdf.iterations,
                                  luks2.digest_of(volume, k).iterations) <= cap for k in slots),
          "a keyslot above the KDF caps")
    check([k.id for k in slots] == [k.id for k in order if k in slots], "affordable keyslots out of order")
    error = luks2.no_keyslot_opened(volume, caps)  # what a wrong key is told
    check(isinstance(error, SifError) and type(error) is not SifError and "\n" not in str(error), "error")


def _check_volume(v: luks2.Luks2Volume, size: int) -> None:
    """What read_luks2 promises about a volume it accepts, checked independently of its code."""
    seg = v.segment
    check(2 * v.header_size <= seg.offset and seg.offset % 512 == 0, "segment overlaps the headers")
    check(seg.offset + seg.size <= size and seg.size % seg.sector_size == 0, "segment outside the volume")
    for k in v.keyslots:
        check(2 * v.header_size <= k.area_offset and k.area_offset + k.area_size <= seg.offset
              and k.area_size >= k.key_size * k.af_stripes, f"keyslot {k.id} area")
        check(k.kdf.memory_kib <= luks2.ARGON2_MAX_MEMORY_KIB and k.kdf.threads >= 1, "KDF limits")


# ---------------------------------------------------------------------------------------------
# The custom mutator: structure-aware half of the time.


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris  # only the fuzzer needs it; replaying inputs must not
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return atheris.Mutate(data, max_size)
    start = PREFIX + (OVERLAY if data[:1] and data[0] & 0x40 else 0)
    first, nul, second = data[start:].partition(b"\0")
    try:
        tree = _mutate_tree(json.loads(first), rng)
    except (ValueError, RecursionError):  # not JSON (yet), or nested too deep to walk
        return atheris.Mutate(data, max_size)
    out = data[:start] + json.dumps(tree, separators=(",", ":")).encode() + nul + second
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


def _mutate_tree(tree, rng: random.Random):
    nodes = []  # (container, key) of every value in the tree

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            nodes.append((node, key))
            walk(value)

    walk(tree)
    if not nodes:
        return rng.choice([{"config": {}}, tree])
    node, key = rng.choice(nodes)
    action = rng.randrange(6)
    if action == 0:
        node[key] = json.loads(json.dumps(rng.choice(HOSTILE)))  # a fresh copy, never shared
    elif action == 1 and isinstance(node[key], str) and node[key].isdigit():
        node[key] = str(int(node[key]) + rng.choice([-4096, -512, -1, 1, 512, 4096, 2**32, 2**64]))
    elif action == 2:
        del node[key]
    elif action == 3 and isinstance(node, dict):
        node[rng.choice(ID_KEYS)] = json.loads(json.dumps(node[key]))  # e.g. a second keyslot
    elif action == 4 and isinstance(node[key], dict):
        node[key][rng.choice(FIELDS)] = json.loads(json.dumps(rng.choice(HOSTILE)))
    else:
        other_node, other_key = rng.choice(nodes)
        node[key] = json.loads(json.dumps(other_node[other_key]))
    return tree
