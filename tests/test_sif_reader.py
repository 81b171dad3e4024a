"""The SIF reader agrees with the reference implementation (siftool) field by field: on every test
image shipped with the reference, on images built by siftool itself covering every code it knows,
and on encrypted images laid out the way Apptainer builds them (passphrase and PEM modes).
Also the golden output of ``spank-sif inspect``."""
import datetime
import json
import os

import pytest

import inspect_golden
from reftools import SIF_TEST_IMAGES, luks_format, reftools, run, sifref_build
from siftool_view import GO_ZERO_TIME, assert_same_as_reference, inspect_json_view, read, siftool
from spank_sif import sif

REFERENCE_IMAGES = sorted(SIF_TEST_IMAGES.glob("*.sif"))


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


# --- golden output of `spank-sif inspect` (tests/inspect_golden.py says how the files are made) ----

@pytest.fixture(scope="module")
def golden_images(tmp_path_factory):
    return inspect_golden.images(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("name", inspect_golden.NAMES)
def test_golden_json_says_what_the_reference_says(golden_images, name):
    """Each golden JSON file, read as printed (codes, offsets, times), equals the reference's own
    listing of its image: the golden files are checked against the reference, not only against
    what inspect printed when they were written."""
    doc = json.loads(inspect_golden.golden_file(name, "json").read_text())
    assert doc["name"] == name and doc["file_size"] == golden_images[name].stat().st_size
    assert_same_as_reference(golden_images[name], inspect_json_view(doc))


def _text_facts(text: str) -> tuple[dict, list]:
    """The header facts ("key: value" lines) and the table rows of inspect's text output."""
    head, _, table = text.partition("\n\n")
    facts = dict(line.split(": ", 1) for line in head.splitlines())
    rows = [tuple(line.split()) for line in table.splitlines()]
    return {key: value.strip() for key, value in facts.items()}, rows


@pytest.mark.parametrize("name", inspect_golden.NAMES)
def test_golden_text_says_what_its_json_twin_says(name):
    doc = json.loads(inspect_golden.golden_file(name, "json").read_text())
    facts, rows = _text_facts(inspect_golden.golden_file(name, "text").read_text())
    h = doc["header"]

    def when(t):
        return "-" if t == GO_ZERO_TIME else datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()
    assert facts == {
        "image": name, "file size": f"{doc['file_size']} bytes",
        "launch script": h["launch_script"].rstrip("\n") or "-", "SIF version": h["version"],
        "architecture": h["arch"], "image ID": h["id"], "created": when(h["created_at"]),
        "modified": when(h["modified_at"]),
        "descriptors": (f"{len(doc['descriptors'])} used, {h['descriptors_free']} free of {h['descriptors_total']}, "
                        f"table at {h['descriptors_offset']} ({h['descriptors_size']} bytes)"),
        "data": f"at {h['data_offset']} ({h['data_size']} bytes)", "primary partition": facts["primary partition"]}
    primary = [e["id"] for e in doc["descriptors"] if e.get("part_type_code") == 2]
    assert facts["primary partition"].startswith(f"id {primary[0]}, " if primary else "no primary system partition")

    def cell(value):
        return "-" if value in (None, "", 0) else str(value)

    def link(e):
        return "-" if not e["link"] else f"group {e['link']}" if e["link_is_group"] else str(e["link"])
    expected = [("ID", "TYPE", "GROUP", "LINK", "OFFSET", "SIZE", "FS", "TYPE", "PARTITION", "ARCH", "CRYPTO", "NAME")]
    for e in doc["descriptors"]:
        crypto = f"{e['crypto_format']}/{e['crypto_message_type']}" if "crypto_format" in e else None
        expected.append((str(e["id"]), e["type"], cell(e["group"]), *link(e).split(), str(e["offset"]),
                         str(e["size"]), cell(e.get("fs_type")), cell(e.get("part_type")), cell(e.get("arch")),
                         cell(crypto), cell(e["name"])))
    assert rows == expected


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_inspect_output_matches_golden_files(golden_images, fmt):
    for name, path in golden_images.items():
        golden = inspect_golden.golden_file(name, fmt)
        assert inspect_golden.inspect_output(path, *(["--json"] if fmt == "json" else [])) == golden.read_text(), \
            f"{golden} differs: if inspect's output changed on purpose, run python3 tests/inspect_golden.py"
