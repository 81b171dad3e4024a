"""Shared cases for the LUKS2 and key tests: KDF settings for the real cryptsetup, header surgery."""
import hashlib
import json
from pathlib import Path

# cryptsetup options per keyslot kind, cheap (8 MiB, 4 passes; PBKDF2 at cryptsetup's minimum) so
# the whole matrix stays fast; tests about the KDF itself choose their own.
KDFS = {
    "argon2id": ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "8192",
                 "--pbkdf-parallel", "1"],
    "argon2i": ["--pbkdf", "argon2i", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "8192",
                "--pbkdf-parallel", "1"],
    "pbkdf2": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
}
SECTOR_SIZES = (512, 4096)
# Incompressible data so the squashfs spans many sectors of either size.
PAYLOAD_FILES = {"etc/os-release": b"NAME=spank-sif test\n", "bin/hello": b"#!/bin/sh\necho hello\n" * 300,
                 "data/noise": b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(2048))}


def cryptsetup_args(kdf: str, sector_size: int) -> list[str]:
    return [*KDFS[kdf], "--sector-size", str(sector_size)]


def header_region(volume: Path) -> tuple[bytearray, int]:
    """(both header copies, header size) of a volume made by cryptsetup."""
    with open(volume, "rb") as f:
        head = f.read(4096)
        hdr_size = int.from_bytes(head[8:16], "big")
        f.seek(0)
        return bytearray(f.read(2 * hdr_size)), hdr_size


def metadata(region: bytearray, copy: int = 0) -> dict:
    hdr_size = int.from_bytes(region[8:16], "big")
    base = copy * hdr_size
    return json.loads(bytes(region[base + 4096:base + hdr_size]).split(b"\0", 1)[0])


def set_metadata(region: bytearray, text: bytes, copies=(0, 1)) -> None:
    """Replace the JSON area of the given copies with ``text`` and recompute their checksums."""
    hdr_size = int.from_bytes(region[8:16], "big")
    for copy in copies:
        base = copy * hdr_size
        region[base + 4096:base + hdr_size] = text[:hdr_size - 4096].ljust(hdr_size - 4096, b"\0")
        fix_checksum(region, copy)


def fix_checksum(region: bytearray, copy: int) -> None:
    hdr_size = int.from_bytes(region[8:16], "big")
    base = copy * hdr_size
    region[base + 448:base + 512] = bytes(64)
    region[base + 448:base + 480] = hashlib.sha256(region[base:base + hdr_size]).digest()


def write_volume(path: Path, region: bytes, size: int) -> Path:
    """A sparse volume of ``size`` bytes starting with ``region`` (enough for header parsing)."""
    with open(path, "wb") as f:
        f.write(region)
        f.truncate(size)
    return path


def mutate_json(region: bytearray, change) -> bytearray:
    """A copy of ``region`` whose metadata (both copies) went through ``change(dict)``."""
    out = bytearray(region)
    meta = metadata(out)
    change(meta)
    set_metadata(out, json.dumps(meta).encode())
    return out


# ---------------------------------------------------------------------------------------------
# Header copies that disagree (the images of security finding 1), made by byte edits of a real
# cryptsetup volume's JSON areas, sequence ids and checksums.

# What libcryptsetup's metadata validation rejects (a token needs a type and a keyslots list), so
# a copy carrying it is dropped and the other copy is used, whatever the sequence ids say.
REJECTED_TOKENS = {"0": {}}
# An Argon2id keyslot at cryptsetup's own limits: 4 GiB, far above any site's cap.
ARGON2_4GIB = {"type": "argon2id", "time": 4, "memory": 4194304, "cpus": 1}


def seqid(region: bytearray, copy: int) -> int:
    hdr_size = int.from_bytes(region[8:16], "big")
    return int.from_bytes(region[copy * hdr_size + 16:copy * hdr_size + 24], "big")


def set_copy(region: bytearray, copy: int, meta: dict, seq: int | None = None) -> None:
    """Give header copy ``copy`` (0 primary, 1 secondary) the metadata ``meta`` and, if given, the
    sequence id ``seq``; its checksum is recomputed (the copy is valid as far as bytes go)."""
    hdr_size = int.from_bytes(region[8:16], "big")
    base = copy * hdr_size
    text = json.dumps(meta).encode()
    region[base + 4096:base + hdr_size] = text[:hdr_size - 4096].ljust(hdr_size - 4096, b"\0")
    if seq is not None:
        region[base + 16:base + 24] = seq.to_bytes(8, "big")
    fix_checksum(region, copy)


def with_kdf(meta: dict, slot: str, kdf: dict) -> dict:
    """A copy of ``meta`` whose keyslot ``slot`` claims the KDF ``kdf`` (its salt kept)."""
    out = json.loads(json.dumps(meta))
    out["keyslots"][slot]["kdf"] = {**kdf, "salt": meta["keyslots"][slot]["kdf"]["salt"]}
    return out


def only_keyslot(meta: dict, slot: str) -> dict:
    """A copy of ``meta`` that keeps keyslot ``slot`` alone (in the keyslots and the digests)."""
    out = json.loads(json.dumps(meta))
    out["keyslots"] = {slot: out["keyslots"][slot]}
    for digest in out["digests"].values():
        digest["keyslots"] = [k for k in digest["keyslots"] if k == slot]
    return out


def hostile_two_copies(region: bytearray) -> bytearray:
    """The reproduced attack: the primary copy is newer and shows the volume's cheap keyslot, plus a
    token libcryptsetup rejects; the secondary copy claims Argon2id at 4 GiB. A reader that takes
    the newer copy sees the cheap one; libcryptsetup drops it and runs the 4 GiB derivation."""
    out = bytearray(region)
    meta = metadata(out, 0)
    set_copy(out, 0, {**meta, "tokens": REJECTED_TOKENS}, seqid(out, 0) + 10)
    set_copy(out, 1, with_kdf(meta, "0", ARGON2_4GIB), seqid(out, 1))
    return out


def patch(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into the file at ``offset`` (a volume's header region inside a SIF image)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
