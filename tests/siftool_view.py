"""Compare spank_sif.sif's reading of an image with the reference ``siftool``'s, field by field.

``reference_view(path)`` parses what ``siftool header``, ``siftool list`` and ``siftool info N``
print; ``our_view(image)`` renders our parse in the reference's vocabulary (its names for codes,
its time and size formats); ``inspect_json_view(doc)`` does the same for what ``spank-sif inspect
--json`` printed (the golden files). Each must equal the reference's. The vocabulary tables below
are the reference's (sylabs/sif v2 ``pkg/sif/sif.go`` String methods, ``arch.go``, ``crypto.Hash``
names), not ours.
"""
import datetime
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

from reftools import reftools, run
from spank_sif import sif

GO_DATA_TYPES = {0x4001: "Def.FILE", 0x4002: "Env.Vars", 0x4003: "JSON.Labels", 0x4004: "FS",
                 0x4005: "Signature", 0x4006: "JSON.Generic", 0x4007: "Generic/Raw",
                 0x4008: "Cryptographic Message", 0x4009: "SBOM"}
GO_FS_TYPES = {1: "Squashfs", 2: "Ext3", 3: "Archive", 4: "Raw", 5: "Encrypted squashfs"}
GO_PART_TYPES = {1: "System", 2: "*System", 3: "Data", 4: "Overlay"}
GO_HASHES = {1: "SHA-256", 2: "SHA-384", 3: "SHA-512", 4: "BLAKE2s-256", 5: "BLAKE2b-256"}
GO_FORMATS = {1: "OpenPGP", 2: "PEM"}
GO_MESSAGES = {0x100: "Clear Signature", 0x200: "RSA-OAEP"}
GO_SBOM = {1: "cyclonedx-json", 2: "cyclonedx-xml", 3: "github-json", 4: "spdx-json", 5: "spdx-rdf",
           6: "spdx-tag-value", 7: "spdx-yaml", 8: "syft-json"}
# The architectures Debian's sif 2.8.3 knows (arch.go); it says "unknown" for any other.
GO_ARCH_KNOWN = {"386", "amd64", "arm", "arm64", "ppc64", "ppc64le", "mips", "mipsle", "mips64", "mips64le",
                 "s390x", "riscv64"}
GO_ZERO_TIME = -62135596800  # Go's zero time.Time in Unix seconds: the reference prints no time for it
NIL_UUID = "00000000-0000-0000-0000-000000000000"


def siftool(*args) -> str:
    return run(reftools()[0], *args).stdout.decode()


def _pairs(text: str) -> dict:
    return dict(re.match(r"\s*([^:]+):\s+(.*)$", line).groups() for line in text.splitlines() if line.strip())


def reference_view(path) -> dict:
    """What the reference reports about the image at ``path``."""
    rows = []
    for line in siftool("list", path).splitlines()[3:]:
        rows.append(tuple(" ".join(cell.split()) for cell in line.split("|")))
    info = {int(row[0]): _pairs(siftool("info", row[0], path)) for row in rows}
    return {"header": _pairs(siftool("header", path)), "list": rows, "info": info}


def go_time(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def go_size(size: int) -> str:
    """siftool's readableSize."""
    if -1024 < size < 1024:
        return f"{size} B"
    div, exp, n = 1024, 0, size // 1024
    while n <= -1024 or n >= 1024:
        div, exp, n = div * 1024, exp + 1, int(n / 1024)
    return f"{math.floor(size / div + 0.5)} {'KMGTPE'[exp]}iB"   # Go's math.Round: halves away from 0


def _arch(name: str) -> str:
    return name if name in GO_ARCH_KNOWN else "unknown"


def _type_column(d: sif.Descriptor) -> str:
    name = GO_DATA_TYPES.get(d.data_type, "Unknown")
    if d.fs_type is not None:
        fs, part = GO_FS_TYPES.get(int(d.fs_type), "Unknown"), GO_PART_TYPES.get(int(d.part_type), "Unknown")
        return f"{name} ({fs}/{part}/{_arch(d.arch)})"
    if d.hash_type is not None:
        return f"{name} ({GO_HASHES[int(d.hash_type)]})"
    if d.crypto_format is not None:
        fmt = GO_FORMATS.get(int(d.crypto_format), "Unknown")
        return f"{name} ({fmt}/{GO_MESSAGES.get(int(d.crypto_message_type), 'Unknown')})"
    if d.sbom_format is not None:
        return f"{name} ({GO_SBOM.get(int(d.sbom_format), 'unknown')})"
    return name


def _link(d: sif.Descriptor) -> str:
    if not d.link:
        return "NONE"
    return f"{d.link} (G)" if d.link_is_group else str(d.link)


def _info(d: sif.Descriptor) -> dict:
    info = {"Data Type": GO_DATA_TYPES.get(d.data_type, "Unknown"), "ID": str(d.id),
            "Group ID": str(d.group or "NONE"), "Linked ID": _link(d), "Offset": str(d.offset),
            "Size": str(d.size)}
    for key, t in (("Created At", d.created_at), ("Modified At", d.modified_at)):
        if t != GO_ZERO_TIME:
            info[key] = go_time(t)
    if d.name:
        info["Name"] = d.name
    if d.fs_type is not None:
        info.update({"Filesystem Type": GO_FS_TYPES.get(int(d.fs_type), "Unknown"),
                     "Partition Type": GO_PART_TYPES.get(int(d.part_type), "Unknown"),
                     "Architecture": _arch(d.arch)})
    if d.hash_type is not None:
        info["Hash Type"] = GO_HASHES[int(d.hash_type)]
        if d.entity is not None:
            info["Entity"] = d.entity.hex().upper()
    if d.crypto_format is not None:
        info.update({"Format Type": GO_FORMATS.get(int(d.crypto_format), "Unknown"),
                     "Message Type": GO_MESSAGES.get(int(d.crypto_message_type), "Unknown")})
    if d.sbom_format is not None:
        info["Format"] = GO_SBOM.get(int(d.sbom_format), "unknown")
    return info


def _view(h, descriptors) -> dict:
    """The reference's view of a header ``h`` and its used ``descriptors`` (objects with the field
    names of sif.Header and sif.Descriptor, version as text)."""
    header = {}
    if h.launch_script:
        header["Launch Script"] = h.launch_script.removesuffix("\n")
    header["Version"] = h.version
    if _arch(h.arch) != "unknown":
        header["Primary Architecture"] = h.arch
    if h.uuid != NIL_UUID:
        header["ID"] = h.uuid
    for key, t in (("Created At", h.created_at), ("Modified At", h.modified_at)):
        if t != GO_ZERO_TIME:
            header[key] = go_time(t)
    header.update({
        "Descriptors Free": str(h.descriptors_free), "Descriptors Total": str(h.descriptors_total),
        "Descriptors Offset": str(h.descriptors_offset), "Descriptors Size": go_size(h.descriptors_size),
        "Data Offset": str(h.data_offset), "Data Size": go_size(h.data_size)})
    rows = [(str(d.id), str(d.group or "NONE"), _link(d), f"{d.offset}-{d.offset + d.size}", _type_column(d))
            for d in descriptors]
    return {"header": header, "list": rows, "info": {d.id: _info(d) for d in descriptors}}


def our_view(image: sif.SifImage) -> dict:
    """Our parse of the image, said the way the reference says it."""
    return _view(image.header._replace(version=image.header.version.rstrip(b"\0").decode()), image.descriptors)


def inspect_json_view(doc: dict) -> dict:
    """What ``spank-sif inspect --json`` printed, said the way the reference says it: from the
    printed numbers alone (codes, offsets, times), not from a parse of the image."""
    h = doc["header"]
    header = SimpleNamespace(uuid=h["id"], **{k: v for k, v in h.items() if k != "id"})
    descriptors = [SimpleNamespace(
        id=e["id"], data_type=e["type_code"], group=e["group"], link=e["link"], link_is_group=e["link_is_group"],
        offset=e["offset"], size=e["size"], created_at=e["created_at"], modified_at=e["modified_at"], name=e["name"],
        fs_type=e.get("fs_type_code"), part_type=e.get("part_type_code"), arch=e.get("arch"),
        hash_type=e.get("hash_type_code"), entity=bytes.fromhex(e["entity"]) if e.get("entity") else None,
        crypto_format=e.get("crypto_format_code"), crypto_message_type=e.get("crypto_message_type_code"),
        sbom_format=e.get("sbom_format_code")) for e in doc["descriptors"]]
    return _view(header, descriptors)


def read(path) -> sif.SifImage:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sif.read_sif(fd, name=Path(path).name)
    finally:
        os.close(fd)


def assert_same_as_reference(path, view: dict | None = None):
    """Our reading of the image at ``path`` (or ``view`` of it) equals the reference's, part by part."""
    ours, ref = view or our_view(read(path)), reference_view(path)
    assert ours["header"] == ref["header"]
    assert ours["list"] == ref["list"]
    assert ours["info"] == ref["info"]
