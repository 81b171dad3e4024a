"""Hostile and broken SIF input: a catalogue of malformed images, property/fuzz tests, and the CLI.

Whatever the bytes, the reader ends in a typed ``SifError`` with a one-line message (or a valid,
consistent image), never another exception, never a hang, never a read beyond the file.
"""
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reftools import REPO, SIF_TEST_IMAGES
from spank_sif import sif
from spank_sif.errors import ImageError, SifError, UnsupportedImageError

HEADER_FIELDS = ("launch_script", "magic", "version", "arch", "id", "created_at", "modified_at",
                 "descriptors_free", "descriptors_total", "descriptors_offset", "descriptors_size",
                 "data_offset", "data_size")
DESCRIPTOR_FIELDS = ("data_type", "used", "id", "group_id", "linked_id", "offset", "size",
                     "size_with_padding", "created_at", "modified_at", "uid", "gid", "name", "extra")
TABLE = sif.DEFAULT_DESCRIPTORS_OFFSET


def build(objects=None) -> bytes:
    """A valid image as Apptainer lays out a PEM-mode encrypted one, as bytes."""
    fd = os.memfd_create("valid.sif")
    try:
        sif.write_sif(fd, objects or sif.apptainer_layout(
            b"LUKS\xba\xbe" + bytes(8186), deffile=b"Bootstrap: docker\n",
            json_objects={"oci-config.json": b"{}"}, crypto_message=b"-----BEGIN MESSAGE-----\n"),
            image_id=bytes(16), created_at=0)
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


VALID = build()     # ids: 1 deffile, 2 json, 3 partition (at 32768), 4 crypto message (at 40960)


def with_header(raw: bytes, **changes) -> bytes:
    fields = dict(zip(HEADER_FIELDS, sif.HEADER.unpack_from(raw)))
    fields.update(changes)
    return sif.HEADER.pack(*fields.values()) + raw[sif.HEADER.size:]


def with_descriptor(raw: bytes, slot: int, **changes) -> bytes:
    at = TABLE + slot * sif.DESCRIPTOR.size
    fields = dict(zip(DESCRIPTOR_FIELDS, sif.DESCRIPTOR.unpack_from(raw, at)))
    fields.update(changes)
    return raw[:at] + sif.DESCRIPTOR.pack(*fields.values()) + raw[at + sif.DESCRIPTOR.size:]


def descriptor(raw: bytes, slot: int) -> dict:
    return dict(zip(DESCRIPTOR_FIELDS, sif.DESCRIPTOR.unpack_from(raw, TABLE + slot * sif.DESCRIPTOR.size)))


def memfd(raw: bytes) -> int:
    fd = os.memfd_create("image.sif")
    os.write(fd, raw)
    return fd


def parse(raw: bytes) -> sif.SifImage:
    fd = memfd(raw)
    try:
        return sif.read_sif(fd, name="bad.sif")
    finally:
        os.close(fd)


def partition_image(fs_type, part_type=sif.PartType.PRIMSYS, count=1) -> bytes:
    return build([sif.SifObject.partition(b"x" * 10, fs_type, part_type) for _ in range(count)])


P = descriptor(VALID, 2)          # the partition
END = len(VALID)

# (id, bytes, error type, fragment of the message)
CATALOGUE = [
    ("empty-file", b"", ImageError, "the file is empty"),
    ("shorter-than-header", VALID[:100], ImageError, "only 100 bytes long"),
    ("not-sif", b"\x7fELF" + bytes(4000), ImageError, "not a SIF image (no SIF_MAGIC at byte 32)"),
    ("magic-without-nul", with_header(VALID, magic=b"SIF_MAGICX"), ImageError, "no SIF_MAGIC"),
    ("version-02", with_header(VALID, version=b"02\0"), ImageError, "SIF version '02' is not supported"),
    ("version-garbage", with_header(VALID, version=b"\xff\xfe\0"), ImageError, "is not supported"),
    ("huge-count", with_header(VALID, descriptors_total=1 << 40, descriptors_size=(1 << 40) * 585),
     ImageError, "descriptor count 1099511627776 is outside"),
    ("negative-count", with_header(VALID, descriptors_total=-1), ImageError, "descriptor count -1"),
    ("count-just-above-cap", with_header(VALID, descriptors_total=sif.MAX_DESCRIPTORS + 1),
     ImageError, "is outside 0..65536"),
    ("free-above-total", with_header(VALID, descriptors_free=49), ImageError, "free descriptor count 49"),
    ("free-negative", with_header(VALID, descriptors_free=-5), ImageError, "free descriptor count -5"),
    ("table-size-mismatch", with_header(VALID, descriptors_size=585 * 47), ImageError,
     "descriptor table size 27495 is not 48 x 585 bytes"),
    ("table-size-negative", with_header(VALID, descriptors_size=-585 * 48), ImageError, "table size"),
    ("table-in-header", with_header(VALID, descriptors_offset=64), ImageError, "inside the 128-byte header"),
    ("table-negative-offset", with_header(VALID, descriptors_offset=-4096), ImageError, "inside the 128-byte"),
    ("table-past-eof", with_header(VALID, descriptors_offset=END - 100), ImageError,
     f"descriptor table [{END - 100}, {END - 100 + 28080}) extends past the end of the file ({END} bytes)"),
    ("table-offset-huge", with_header(VALID, descriptors_offset=(1 << 63) - 1), ImageError, "past the end"),
    ("many-descriptors-small-file",
     with_header(VALID, descriptors_total=60000, descriptors_size=60000 * 585, descriptors_free=0),
     ImageError, "extends past the end of the file"),
    ("data-overlaps-table", with_header(VALID, data_offset=4096), ImageError,
     "data section offset 4096 lies before the end of the descriptor table [4096, 32176)"),
    ("data-size-negative", with_header(VALID, data_size=-1), ImageError, "data section size -1 is negative"),
    ("data-past-eof", with_header(VALID, data_size=END), ImageError, "data section [32176, "),
    ("data-size-huge", with_header(VALID, data_size=(1 << 63) - 32177), ImageError, "past the end"),
    ("object-past-eof", with_descriptor(VALID, 2, size=99999999), ImageError,
     f"bad.sif: descriptor 3 (id 3) data [32768, {32768 + 99999999}) extends past the end of the file "
     f"({END} bytes): the image is truncated or corrupt"),
    ("object-offset-negative", with_descriptor(VALID, 2, offset=-4096), ImageError, "negative offset or size"),
    ("object-size-negative", with_descriptor(VALID, 2, size=-1), ImageError, "negative offset or size"),
    ("object-padding-negative", with_descriptor(VALID, 2, size_with_padding=-7), ImageError, "negative"),
    ("object-offset-huge", with_descriptor(VALID, 2, offset=(1 << 63) - 10), ImageError, "past the end"),
    ("objects-overlap", with_descriptor(VALID, 3, offset=P["offset"] + 100), ImageError,
     "descriptor 3 (id 3) data [32768, 40960) overlaps descriptor 4 (id 4) data [32868, 32892)"),
    ("object-inside-another", with_descriptor(VALID, 0, offset=P["offset"] + 8, size=8), ImageError,
     "overlaps descriptor"),
    ("object-over-header", with_descriptor(VALID, 0, offset=0), ImageError, "overlaps the global header"),
    ("object-over-table", with_descriptor(VALID, 1, offset=TABLE + 585), ImageError,
     "overlaps the descriptor table [4096, 32176)"),
    ("id-zero", with_descriptor(VALID, 1, id=0), ImageError, "object ID 0 is not valid"),
    ("id-with-group-bits", with_descriptor(VALID, 1, id=0xF0000002), ImageError, "is not valid"),
    ("id-twice", with_descriptor(VALID, 3, id=3), ImageError, "object ID 3 is used twice"),
    ("unused-slot-garbage-is-ignored-but-used-flag-is-not",
     with_descriptor(VALID, 10, used=True, id=11, offset=END, size=1), ImageError, "past the end"),
]


@pytest.mark.parametrize("raw, error, fragment", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_malformed_image_is_a_one_line_typed_error(raw, error, fragment):
    with pytest.raises(error) as caught:
        parse(raw)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message and message.startswith("bad.sif: ")


def test_the_valid_base_image_is_valid():
    # The catalogue means something only if the image it breaks is fine to begin with.
    image = parse(VALID)
    assert [d.id for d in image.descriptors] == [1, 2, 3, 4] and image.file_size == END


def test_garbage_in_unused_slots_is_ignored():
    raw = with_descriptor(VALID, 20, used=False, id=0, offset=-1, size=1 << 62)
    assert len(parse(raw).descriptors) == 4


CUTS = sorted({1, 31, 32, 42, 45, 64, 127, 128, 129, 4095, TABLE, TABLE + 1, TABLE + 585, TABLE + 3 * 585 + 7,
               32175, 32176, 32200, P["offset"], P["offset"] + 1, P["offset"] + 8192, END - 24, END - 1})


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_anywhere_is_an_image_error(cut):
    with pytest.raises(ImageError) as caught:
        parse(VALID[:cut])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("cut", range(0, END, 997))
def test_truncated_reference_image_is_an_image_error(cut):
    raw = (SIF_TEST_IMAGES / "one-group-signed.sif").read_bytes()
    with pytest.raises(ImageError):
        parse(raw[:cut * len(raw) // END])


@pytest.mark.parametrize("raw, error, fragment", [
    (partition_image(sif.FsType.GOCRYPTFS_SQUASHFS), UnsupportedImageError, "is gocryptfs-encrypted"),
    (partition_image(sif.FsType.EXT3), UnsupportedImageError, "holds a ext3 file system"),
    (partition_image(sif.FsType.RAW), UnsupportedImageError, "squashfs partitions only"),
    (partition_image(42), UnsupportedImageError, "holds a unknown(42) file system"),
    (partition_image(sif.FsType.SQUASHFS, sif.PartType.DATA), UnsupportedImageError,
     "no primary system partition"),
    (build([sif.SifObject(sif.DataType.DEFFILE, b"x")]), UnsupportedImageError, "no primary system partition"),
    (partition_image(sif.FsType.ENCRYPTED_SQUASHFS, count=2), UnsupportedImageError,
     "2 primary system partitions (ids 1, 2)"),
    # Size 0 would make the loop device span the rest of the file (the kernel's "no limit").
    (build([sif.SifObject.partition(b"", sif.FsType.SQUASHFS, sif.PartType.PRIMSYS)]), UnsupportedImageError,
     "primary partition (id 1) is empty (0 bytes)"),
    (with_descriptor(partition_image(sif.FsType.ENCRYPTED_SQUASHFS), 0, size=0), UnsupportedImageError,
     "is empty (0 bytes)"),
], ids=["gocryptfs", "ext3", "raw", "unknown-fs", "data-partition-only", "no-partition", "two-primaries",
        "empty-partition", "size-zero-encrypted"])
def test_unusable_primary_partition(raw, error, fragment):
    image = parse(raw)                       # a valid SIF: inspect shows it ...
    with pytest.raises(error) as caught:     # ... but it cannot be run
        image.primary_partition()
    assert fragment in str(caught.value) and issubclass(error, ImageError)


@pytest.mark.parametrize("fs_type", [sif.FsType.SQUASHFS, sif.FsType.ENCRYPTED_SQUASHFS])
def test_runnable_primary_partition(fs_type):
    assert parse(partition_image(fs_type)).primary_partition().fs_type == fs_type


def test_directory_fd(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ImageError, match="is a directory, not a SIF image"):
            sif.read_sif(fd, name=str(tmp_path))
    finally:
        os.close(fd)


def test_character_device_fd():
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(ImageError, match="not a regular file"):
            sif.read_sif(fd)
    finally:
        os.close(fd)


def test_unreadable_fd_is_an_image_error(tmp_path):
    (tmp_path / "w.sif").write_bytes(VALID)
    fd = os.open(tmp_path / "w.sif", os.O_WRONLY)
    try:
        with pytest.raises(ImageError, match="cannot read the global header of image: Bad file descriptor"):
            sif.read_sif(fd)
    finally:
        os.close(fd)


def test_size_claimed_larger_than_the_file_is_caught_at_read():
    fd = memfd(VALID[:TABLE + 100])
    try:
        with pytest.raises(ImageError, match="is cut short at byte 4196"):
            sif.read_sif(fd, size=END)
    finally:
        os.close(fd)


def test_read_object_respects_its_limit_and_the_file():
    image, fd = parse(VALID), memfd(VALID)
    part = image.primary_partition()
    try:
        with pytest.raises(ImageError, match=r"object id 3 \(partition\) is 8192 bytes, more than the 4096"):
            image.read_object(fd, part, limit=4096)
        os.ftruncate(fd, part.offset + 10)            # the file shrank after it was read
        with pytest.raises(ImageError, match="cut short"):
            image.read_object(fd, part, limit=1 << 20)
    finally:
        os.close(fd)


# --- property and fuzz tests -------------------------------------------------------------------

def check_any(raw: bytes) -> None:
    """The contract for arbitrary bytes: a typed error, or an image whose objects all lie inside
    the file without overlapping; using the image raises only typed errors as well."""
    try:
        image = parse(raw)
    except SifError as err:
        assert "\n" not in str(err)
        return
    spans = sorted((d.offset, d.end) for d in image.descriptors if d.size)
    assert all(0 <= a < b <= len(raw) for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    image.to_dict()
    try:
        image.crypto_messages(image.primary_partition())
    except UnsupportedImageError:
        pass


FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(raw):
    check_any(raw)


@FUZZ
@given(st.binary(min_size=96, max_size=96))
def test_random_header_after_valid_magic(tail):
    check_any(VALID[:32] + sif.MAGIC + sif.VERSION + tail[:83] + VALID[128:])


MUTABLE = TABLE + 5 * sif.DESCRIPTOR.size     # header, table head, and a free slot


@FUZZ
@given(st.lists(st.tuples(st.integers(0, MUTABLE - 1), st.integers(0, 255)), min_size=1, max_size=12),
       st.integers(0, END))
def test_random_mutations_of_a_valid_image(edits, cut):
    raw = bytearray(VALID)
    for at, value in edits:
        raw[at] = value
    check_any(bytes(raw[:cut]) if cut % 3 == 0 else bytes(raw))


FIELD_VALUES = st.sampled_from([0, 1, -1, 128, 4096, 32176, 32768, END - 1, END, END + 1, 1 << 31,
                                (1 << 32) - 1, (1 << 62), (1 << 63) - 1, -(1 << 63)])


@FUZZ
@given(st.dictionaries(st.sampled_from(HEADER_FIELDS[7:]), FIELD_VALUES),
       st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["offset", "size", "id", "used"]), FIELD_VALUES),
                max_size=4))
def test_hostile_field_values(header_changes, descriptor_changes):
    raw = with_header(VALID, **header_changes)
    for slot, field, value in descriptor_changes:
        if field == "id":
            value &= 0xFFFFFFFF
        elif field == "used":
            value = bool(value)
        raw = with_descriptor(raw, slot, **{field: value})
    check_any(raw)


# --- the command line ----------------------------------------------------------------------------

CLI_CASES = ["empty-file", "not-sif", "version-02", "huge-count", "table-past-eof", "object-past-eof",
             "objects-overlap", "id-twice"]


def run_inspect(target, *flags):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "spank_sif", "inspect", str(target), *flags],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_inspect_on_malformed_image(tmp_path, case):
    raw = dict((c[0], c[1]) for c in CATALOGUE)[case]
    (tmp_path / "bad.sif").write_bytes(raw)
    for flags in ((), ("--json",)):
        result = run_inspect(tmp_path / "bad.sif", *flags)
        assert result.returncode == 3
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"spank-sif: {tmp_path / 'bad.sif'}: ")


@pytest.mark.parametrize("target, fragment", [
    ("/", "is a directory"), ("/dev/null", "not a regular file"),
    ("/nonexistent/app.sif", "cannot open the image: No such file or directory"),
])
def test_cli_inspect_on_things_that_are_not_images(target, fragment):
    result = run_inspect(target)
    assert result.returncode == 3 and result.stderr.count("\n") == 1 and fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_inspect_gocryptfs_image_shows_it_and_says_why_it_cannot_run(tmp_path):
    (tmp_path / "g.sif").write_bytes(partition_image(sif.FsType.GOCRYPTFS_SQUASHFS))
    result = run_inspect(tmp_path / "g.sif")
    assert result.returncode == 0 and "gocryptfs-squashfs" in result.stdout
    assert "primary partition: the primary partition (id 1) is gocryptfs-encrypted" in result.stdout
