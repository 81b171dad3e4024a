"""The SIF writer lays images out exactly as the reference library does for Apptainer's encrypted
images (byte for byte, apart from the random image ID and the clock), and the reference siftool
reads whatever it writes as we do."""
import os
import struct

import pytest

from reftools import luks_format, reftools, run, sifref_build
from siftool_view import assert_same_as_reference, read, siftool
from spank_sif import sif


def clock_and_id_masked(raw: bytes, used: int) -> bytes:
    """The image bytes with the image ID and every timestamp zeroed (the only fields that differ
    between two builds of the same inputs)."""
    b = bytearray(raw)
    b[48:80] = bytes(32)                                  # ID, CreatedAt, ModifiedAt
    for i in range(used):
        at = sif.DEFAULT_DESCRIPTORS_OFFSET + i * sif.DESCRIPTOR.size + 41
        b[at:at + 16] = bytes(16)                         # descriptor CreatedAt, ModifiedAt
    return bytes(b)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("writer")
    (d / "def").write_bytes(b"Bootstrap: docker\nFrom: alpine:3\n%post\n  true\n")
    (d / "b.json").write_bytes(b'{"b": 2}')
    (d / "a.json").write_bytes(b'{"a": 1, "long": "' + b"x" * 3000 + b'"}')
    luks_format(d / "vol.luks", b"passphrase", 17 * 1024 * 1024)
    return d


@pytest.mark.parametrize("mode", ["passphrase", "pem"])
def test_apptainer_layout_is_byte_identical_to_the_reference_builder(inputs, tmp_path, mode):
    d = inputs
    kw = {}
    if mode == "pem":
        _, sifref = reftools()
        run(sifref, "genkey", "-pub", tmp_path / "pub.pem", "-priv", tmp_path / "priv.pem")
        run(sifref, "randkey", "-o", tmp_path / "key")
        kw = {"pem_pub": tmp_path / "pub.pem", "key": tmp_path / "key"}
    # Apptainer adds JSON objects in name order, as sifref does: both are given them out of order.
    ref = sifref_build(tmp_path / "ref.sif", d / "vol.luks", deffile=d / "def",
                       json={"b.json": d / "b.json", "a.json": d / "a.json"}, **kw)
    # The wrapped key is randomised (OAEP): take the reference's message to compare layouts.
    message = run(reftools()[0], "dump", "5", ref).stdout if mode == "pem" else None
    ours = tmp_path / "ours.sif"
    image = sif.write_sif(ours, sif.apptainer_layout(
        d / "vol.luks", deffile=(d / "def").read_bytes(),
        json_objects={"b.json": d / "b.json", "a.json": d / "a.json"}, crypto_message=message))
    used = len(image.descriptors)
    assert used == (5 if mode == "pem" else 4)
    assert clock_and_id_masked(ours.read_bytes(), used) == clock_and_id_masked(ref.read_bytes(), used)
    assert_same_as_reference(ours)


def test_written_objects_read_back_by_siftool_and_by_us(tmp_path):
    payload = os.urandom(5000)
    objects = [
        sif.SifObject(sif.DataType.DEFFILE, b"Bootstrap: scratch\n"),
        sif.SifObject(sif.DataType.ENV_VAR, b"A=1\n", group=0),
        sif.SifObject(sif.DataType.LABELS, b"{}", group=2, name="labels.json"),
        sif.SifObject.partition(payload, sif.FsType.SQUASHFS, sif.PartType.PRIMSYS, "ppc64le"),
        sif.SifObject.partition(b"ext3", sif.FsType.EXT3, sif.PartType.OVERLAY, "s390x", group=2),
        sif.SifObject(sif.DataType.SIGNATURE, b"sig", link=1, link_is_group=True, group=0,
                      extra=struct.pack("<i", sif.HashType.SHA512) + bytes.fromhex("AB" * 20)),
        sif.SifObject(sif.DataType.GENERIC, b"raw", alignment=512),
        sif.SifObject.crypto_message(b"msg", link=4),
    ]
    path = tmp_path / "w.sif"
    image = sif.write_sif(path, objects, launch_script="#!/bin/true\n", created_at=1234567890)
    assert_same_as_reference(path)
    again = read(path)
    assert (image.header, image.descriptors) == (again.header, again.descriptors)
    assert image.header.arch == "ppc64le" and image.header.created_at == 1234567890
    assert [d.id for d in image.descriptors] == list(range(1, 9))
    assert image.descriptors[3].offset % 4096 == 0 and image.descriptors[6].offset % 512 == 0
    fd = os.open(path, os.O_RDONLY)
    try:
        assert image.read_object(fd, image.descriptors[3], limit=5000) == payload
    finally:
        os.close(fd)
    assert run(reftools()[0], "dump", "4", path).stdout == payload


def test_writes_to_an_open_fd_replacing_its_content(tmp_path):
    path = tmp_path / "fd.sif"
    path.write_bytes(b"old content " * 100000)
    fd = os.open(path, os.O_RDWR)
    try:
        image = sif.write_sif(fd, [sif.SifObject.partition(b"hsqs", sif.FsType.SQUASHFS)])
    finally:
        os.close(fd)
    assert os.path.getsize(path) == image.file_size == 32768 + 4
    assert_same_as_reference(path)


def test_partition_copied_from_a_sparse_file_keeps_its_content(tmp_path):
    src = tmp_path / "sparse.bin"
    with open(src, "wb") as f:
        f.truncate(5 * 1024 * 1024 + 7)
        f.seek(3 * 1024 * 1024 + 5)
        f.write(b"middle")
        f.seek(5 * 1024 * 1024)
        f.write(b"the end")
    image = sif.write_sif(tmp_path / "s.sif", [sif.SifObject.partition(src, sif.FsType.RAW)])
    fd = os.open(tmp_path / "s.sif", os.O_RDONLY)
    try:
        assert image.read_object(fd, image.descriptors[0], limit=1 << 30) == src.read_bytes()
    finally:
        os.close(fd)


@pytest.mark.parametrize("objects, kw", [
    ([sif.SifObject(sif.DataType.GENERIC, b"")] * 3, {"descriptors_total": 2}),
    ([sif.SifObject(sif.DataType.GENERIC, b"", name="n" * 129)], {}),
    ([], {"launch_script": "#" * 32}),
], ids=["too-many-objects", "name-too-long", "launch-script-too-long"])
def test_writer_misuse_is_a_value_error(tmp_path, objects, kw):
    with pytest.raises(ValueError):
        sif.write_sif(tmp_path / "bad.sif", objects, **kw)


def test_siftool_can_modify_what_we_write(tmp_path):
    # A further proof the layout is what the reference expects: it appends to it and reads it back.
    path = tmp_path / "m.sif"
    sif.write_sif(path, sif.apptainer_layout(b"LUKS\xba\xbe" + bytes(5000), deffile=b"x"))
    (tmp_path / "extra").write_bytes(b"extra object")
    siftool("add", "--datatype", "7", path, tmp_path / "extra")
    assert_same_as_reference(path)
    assert [d.type for d in read(path).descriptors][-1] == sif.DataType.GENERIC
