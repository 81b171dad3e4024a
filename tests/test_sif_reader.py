"""The SIF reader agrees with the reference implementation (siftool) field by field: on every test
image shipped with the reference, on images built by siftool itself covering every code it knows,
and on encrypted images laid out the way Apptainer builds them (passphrase and PEM modes).
Also the golden output of ``spank-sif inspect``."""
import io
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from reftools import SIF_TEST_IMAGES, luks_format, reftools, run, sifref_build
from siftool_view import assert_same_as_reference, read, siftool
from spank_sif import sif
from spank_sif.cli import main

REFERENCE_IMAGES = sorted(SIF_TEST_IMAGES.glob("*.sif"))
GOLDEN = Path(__file__).resolve().parent / "golden" / "inspect"


def test_all_reference_images_are_present():
    assert len(REFERENCE_IMAGES) >= 17


@pytest.mark.parametrize("path", REFERENCE_IMAGES, ids=lambda p: p.name)
def test_reference_test_images_parse_as_the_reference_reads_them(path):
    assert_same_as_reference(path)


# Images made with `siftool new` + `siftool add`, one per row: every data type, fs type, partition
# type, architecture, hash type and SBOM format siftool can write, groups, links and alignment.
SIFTOOL_ADDS = {
    "deffile": [["--datatype", "1"]],
    "envvar-labels-generic": [["--datatype", "2"], ["--datatype", "3"], ["--datatype", "7", "--groupid", "3"]],
    "json-named": [["--datatype", "6", "--filename", "inspect-metadata.json"]],
    "crypto-message": [["--datatype", "8", "--link", "1"]],
    "sbom-formats": [["--datatype", "9", "--sbomformat", f] for f in
                     ("cyclonedx-json", "cyclonedx-xml", "github-json", "spdx-json", "spdx-rdf",
                      "spdx-tag-value", "spdx-yaml", "syft-json")],
    "partitions": [["--datatype", "4", "--partfs", str(fs), "--parttype", str(pt), "--partarch", str(arch),
                    "--groupid", str(pt)]
                   for fs, pt, arch in ((1, 2, 2), (2, 1, 1), (3, 3, 4), (4, 4, 11))],
    "all-arches": [["--datatype", "4", "--partfs", "4", "--parttype", "3", "--partarch", str(a)]
                   for a in range(1, 13)],
    "signatures": [["--datatype", "5", "--signhash", str(h), "--signentity",
                    "433FE984155206BD962725E20E8713472A879943", "--link", "1"] for h in range(1, 6)],
    "aligned-and-linked": [["--datatype", "7", "--alignment", "65536"],
                           ["--datatype", "7", "--link", "1", "--groupid", "2"],
                           ["--datatype", "5", "--signhash", "1", "--signentity",
                            "433FE984155206BD962725E20E8713472A879943", "--groupid", "0"]],
}


@pytest.mark.parametrize("name", sorted(SIFTOOL_ADDS))
def test_images_built_by_siftool_parse_as_siftool_reads_them(tmp_path, name):
    image, payload = tmp_path / "built.sif", tmp_path / "payload.bin"
    payload.write_bytes(b"payload of some length\n" * 7)
    siftool("new", image)
    for flags in SIFTOOL_ADDS[name]:
        siftool("add", *flags, image, payload)
    assert_same_as_reference(image)
    assert len(read(image).descriptors) == len(SIFTOOL_ADDS[name])


@pytest.fixture(scope="module")
def encrypted_images(tmp_path_factory):
    """Images laid out as Apptainer builds encrypted ones, by the reference library (sifref):
    passphrase mode (no crypto message) and PEM mode (RSA-OAEP-wrapped 64-byte key, linked)."""
    d = tmp_path_factory.mktemp("encrypted")
    _, sifref = reftools()
    (d / "def").write_text("Bootstrap: docker\nFrom: alpine\n")
    (d / "meta.json").write_text('{"a": 1}')
    run(sifref, "genkey", "-pub", d / "pub.pem", "-priv", d / "priv.pem", "-bits", "2048")
    run(sifref, "randkey", "-o", d / "pem.key")
    images = {}
    volume = luks_format(d / "pass.luks", b"correct horse", 17 * 1024 * 1024)
    images["passphrase"] = sifref_build(d / "pass.sif", volume, deffile=d / "def",
                                        json={"inspect-metadata.json": d / "meta.json"})
    volume = luks_format(d / "pem.luks", (d / "pem.key").read_bytes(), 17 * 1024 * 1024)
    images["pem"] = sifref_build(d / "pem.sif", volume, deffile=d / "def", pem_pub=d / "pub.pem",
                                 key=d / "pem.key", arch="arm64")
    return images


@pytest.mark.parametrize("mode", ["passphrase", "pem"])
def test_encrypted_images_parse_as_the_reference_reads_them(encrypted_images, mode):
    assert_same_as_reference(encrypted_images[mode])


@pytest.mark.parametrize("mode, messages", [("passphrase", 0), ("pem", 1)])
def test_encrypted_images_primary_partition_and_crypto_messages(encrypted_images, mode, messages):
    path = encrypted_images[mode]
    image = read(path)
    part = image.primary_partition()
    assert (part.fs_type, part.part_type, part.group) == (sif.FsType.ENCRYPTED_SQUASHFS, sif.PartType.PRIMSYS, 1)
    assert part.offset % 4096 == 0 and part.size == 17 * 1024 * 1024
    fd = os.open(path, os.O_RDONLY)
    try:
        assert image.read_object(fd, part, limit=4096 * 1024 * 1024)[:6] == b"LUKS\xba\xbe"
        found = image.crypto_messages(part)
        assert len(found) == messages
        for msg in found:
            assert msg.is_pem_rsa_oaep and msg.link == part.id and not msg.link_is_group
            assert image.read_object(fd, msg, limit=64 * 1024).startswith(b"-----BEGIN MESSAGE-----")
    finally:
        os.close(fd)


def test_crypto_messages_pem_rsa_oaep_first_object_links_only(tmp_path):
    pem = b"-----BEGIN MESSAGE-----\n"
    objects = [
        sif.SifObject.partition(b"LUKS\xba\xbe", sif.FsType.ENCRYPTED_SQUASHFS),            # id 1
        sif.SifObject.crypto_message(b"pgp", link=1, format_type=sif.FormatType.OPENPGP,
                                     message_type=sif.MessageType.CLEAR_SIGNATURE),          # id 2
        sif.SifObject.crypto_message(pem, link=1, link_is_group=True),                       # id 3: group link
        sif.SifObject.crypto_message(pem, link=1),                                           # id 4
        sif.SifObject.crypto_message(pem, link=5),                                           # id 5: other object
        sif.SifObject.crypto_message(pem, link=1),                                           # id 6
    ]
    image = sif.write_sif(tmp_path / "x.sif", objects)
    assert [d.id for d in image.crypto_messages(image.primary_partition())] == [4, 6, 2]


def test_version_1_era_layout_reads(tmp_path):
    # Singularity 3.4 (sif v1.0.8): data at 32768, every object page aligned, builder uid and names.
    objects = [sif.SifObject(sif.DataType.DEFFILE, b"Bootstrap: x\n", name=".", alignment=4096),
               sif.SifObject.partition(b"LUKS\xba\xbe" + bytes(100), sif.FsType.ENCRYPTED_SQUASHFS,
                                       name="crypt-12345")]
    path = tmp_path / "v1.sif"
    sif.write_sif(path, objects)
    # Move the data start to 32768 as v1 did (objects already sit on page boundaries above it).
    with open(path, "r+b") as f:
        raw = bytearray(f.read(128))
        fields = list(sif.HEADER.unpack(bytes(raw)))
        fields[-2], fields[-1] = 32768, fields[-1] - (32768 - fields[-2])
        f.seek(0)
        f.write(sif.HEADER.pack(*fields))
    image = read(path)
    assert image.header.data_offset == 32768
    assert [d.offset for d in image.descriptors] == [32768, 36864]
    assert image.primary_partition().name == "crypt-12345"
    assert_same_as_reference(path)


def test_extra_encodings_of_v2_only_types(tmp_path):
    digest = "sha256:" + "ab" * 32
    objects = [sif.SifObject(sif.DataType.OCI_BLOB, b"{}", extra=digest.encode() + b"\0"),
               sif.SifObject(sif.DataType.OCI_ROOT_INDEX, b"{}", extra=digest.encode()),
               sif.SifObject(sif.DataType.SBOM, b"{}", extra=(8).to_bytes(4, "little")),
               sif.SifObject.partition(b"x", sif.FsType.GOCRYPTFS_SQUASHFS, arch="loong64")]
    image = sif.write_sif(tmp_path / "v2.sif", objects)
    blob, index, sbom, part = image.descriptors
    assert (blob.type, blob.digest) == (sif.DataType.OCI_BLOB, digest)
    assert (index.type, index.digest) == (sif.DataType.OCI_ROOT_INDEX, digest)
    assert sbom.sbom_format == sif.SbomFormat.SYFT_JSON
    assert (part.fs_type, part.arch, image.header.arch) == (sif.FsType.GOCRYPTFS_SQUASHFS, "loong64", "loong64")
    assert blob.fs_type is None and part.digest is None and part.crypto_format is None


def test_unknown_codes_are_kept_and_labelled(tmp_path):
    image = sif.write_sif(tmp_path / "u.sif", [sif.SifObject(0x4100, b"?"),
                                                sif.SifObject.partition(b"x", 77, part_type=9)])
    odd, part = image.descriptors
    assert (odd.type, sif.label(odd.type)) == (0x4100, "unknown(16640)")
    assert (part.fs_type, part.part_type) == (77, 9)


# --- golden output of `spank-sif inspect` ------------------------------------------------------

GOLDEN_IMAGES = ["two-groups-signed.sif", "one-object-crypt-message.sif", "one-object-sbom.sif",
                 "empty.sif", "one-group-signed-legacy-all.sif"]


def deterministic_encrypted_image(directory: Path) -> Path:
    path = directory / "apptainer-pem.sif"
    sif.write_sif(path, sif.apptainer_layout(
        b"LUKS\xba\xbe\0\2" + bytes(8184), deffile=b"Bootstrap: docker\nFrom: alpine\n",
        json_objects={"oci-config.json": b"{}"}, crypto_message=b"-----BEGIN MESSAGE-----\n"),
        image_id=bytes(range(16)), created_at=1700000000)
    return path


def inspect_output(directory: Path, name: str, *flags: str) -> str:
    cwd = os.getcwd()
    out = io.StringIO()
    try:
        os.chdir(directory)     # the output names the image as given: keep it machine-independent
        with redirect_stdout(out):
            assert main(["inspect", name, *flags]) == 0
    finally:
        os.chdir(cwd)
    return out.getvalue()


def golden_cases(tmp_path):
    return [(SIF_TEST_IMAGES, n) for n in GOLDEN_IMAGES] + [(tmp_path, deterministic_encrypted_image(tmp_path).name)]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_inspect_output_matches_golden_files(tmp_path, fmt):
    flags = ["--json"] if fmt == "json" else []
    for directory, name in golden_cases(tmp_path):
        got = inspect_output(directory, name, *flags)
        if fmt == "json":
            json.loads(got)
        golden = GOLDEN / f"{name}.{'json' if flags else 'txt'}"
        if os.environ.get("UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(got)
        assert got == golden.read_text(), f"{golden} differs (UPDATE_GOLDEN=1 regenerates it)"
