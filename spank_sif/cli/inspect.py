"""``spank-sif inspect IMAGE [--json]``: the global header and descriptor table of a SIF image.

Reads only the header and the descriptor table, whatever the image's size.
"""
import json
import os
import sys

from spank_sif import sif
from spank_sif.cli.common import printable as _printable, table as _table

COLUMNS = ("ID", "TYPE", "GROUP", "LINK", "OFFSET", "SIZE", "FS TYPE", "PARTITION", "ARCH", "CRYPTO", "NAME")


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show the header and descriptor table of a SIF image",
                              description="Show the global header and the descriptor table of a SIF "
                                          "image (exit 3 if it is not a valid SIF image).")
    p.add_argument("image", metavar="IMAGE", help="SIF image file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    fd = sif.open_image(args.image)
    try:
        image = sif.read_sif(fd, name=args.image)
    finally:
        os.close(fd)
    if args.json:
        json.dump(image.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(image))
    return 0


def render(image: sif.SifImage) -> str:
    """The human view: header facts, then one table row per used descriptor."""
    h = image.header
    facts = [
        ("image", _printable(image.name)),
        ("file size", f"{image.file_size} bytes"),
        ("launch script", _printable(h.launch_script.rstrip("\n")) or "-"),
        ("SIF version", h.version.rstrip(b"\0").decode()),
        ("architecture", h.arch),
        ("image ID", h.uuid),
        ("created", sif.format_time(h.created_at) or "-"),
        ("modified", sif.format_time(h.modified_at) or "-"),
        ("descriptors", (f"{len(image.descriptors)} used, {h.descriptors_free} free of {h.descriptors_total}, "
                         f"table at {h.descriptors_offset} ({h.descriptors_size} bytes)")),
        ("data", f"at {h.data_offset} ({h.data_size} bytes)"),
        ("primary partition", _primary(image)),
    ]
    width = max(len(key) for key, _ in facts)
    lines = [f"{key + ':':<{width + 1}} {value}" for key, value in facts]
    lines += ["", *_table([COLUMNS] + [_row(d) for d in image.descriptors])]
    return "\n".join(lines) + "\n"


def _primary(image: sif.SifImage) -> str:
    try:
        part = image.primary_partition()
    except sif.UnsupportedImageError as err:
        return str(err).removeprefix(f"{image.name}: ")
    kind = {sif.FsType.ENCRYPTED_SQUASHFS: "LUKS2-encrypted squashfs",
            sif.FsType.SQUASHFS: "squashfs (not encrypted)"}[part.fs_type]
    messages = image.crypto_messages(part)
    key = f", {len(messages)} crypto message(s) (PEM key)" if messages else ""
    return f"id {part.id}, {kind}{key}"


def _row(d: sif.Descriptor) -> tuple:
    link = "-" if not d.link else f"group {d.link}" if d.link_is_group else str(d.link)
    crypto = (f"{sif.label(d.crypto_format)}/{sif.label(d.crypto_message_type)}"
              if d.crypto_format is not None else "-")
    return (str(d.id), sif.label(d.type), str(d.group or "-"), link, str(d.offset), str(d.size),
            _opt(d.fs_type), _opt(d.part_type), d.arch or "-", crypto, _printable(d.name) or "-")


def _opt(value) -> str:
    return "-" if value is None else sif.label(value)
