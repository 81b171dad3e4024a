"""LUKS2 in userspace against the real cryptsetup: volume keys, payloads, priorities, hostile headers."""
import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import luks_cases
import reftools
from spank_sif import luks2
from spank_sif.errors import ImageError, PolicyError, SifError, UnsupportedImageError, WrongKeyError

KEY = b"correct horse battery staple"
SIZE = 20 << 20


def _open(path):
    fd = os.open(path, os.O_RDONLY)
    return fd, luks2.read_luks2(fd)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("luks2")


@pytest.fixture(scope="module")
def plain_volume(workdir):
    """A default-geometry volume (argon2id, cheap), the base of the header-surgery tests."""
    return reftools.luks_format(workdir / "plain.img", KEY, SIZE)


# ---------------------------------------------------------------------------------------------
# What the parser reads equals what cryptsetup reports (keys themselves: tests/test_libcryptsetup.py).

VOLUME_CASES = {
    **{f"{kdf}-{sector}": luks_cases.cryptsetup_args(kdf, sector)
       for kdf in luks_cases.KDFS for sector in luks_cases.SECTOR_SIZES},
    "argon2id-2-threads": [*luks_cases.KDFS["argon2id"][:-1], "2"],
    "pbkdf2-sha512": [*luks_cases.KDFS["pbkdf2"], "--hash", "sha512"],
    "xts-256-bit-key": [*luks_cases.KDFS["pbkdf2"], "--key-size", "256"],
}


@pytest.mark.parametrize("name", VOLUME_CASES)
def test_metadata_matches_cryptsetup(workdir, name):
    path = reftools.luks_format(workdir / f"{name}.img", KEY, SIZE, *VOLUME_CASES[name], fast=False)
    volume = _read(path)
    dump = json.loads(reftools.run("cryptsetup", "luksDump", "--dump-json-metadata", path).stdout)
    slot, digest = dump["keyslots"]["0"], dump["digests"]["0"]
    kdf = volume.keyslots[0].kdf
    assert kdf.type == slot["kdf"]["type"]
    if kdf.type == "pbkdf2":
        assert (kdf.iterations, kdf.memory_kib) == (slot["kdf"]["iterations"], 0)
    else:
        assert (kdf.memory_kib, kdf.time, kdf.threads) == (slot["kdf"]["memory"], slot["kdf"]["time"],
                                                          slot["kdf"]["cpus"])
    assert volume.keyslots[0].key_size == slot["key_size"]
    assert (volume.digests[0].iterations, volume.digests[0].hash) == (digest["iterations"], digest["hash"])
    assert volume.segment.sector_size == dump["segments"]["0"]["sector_size"]


# ---------------------------------------------------------------------------------------------
# Which keyslots the caps let run, and the messages (the derivations themselves never run here).


def _volume(workdir, region, change):
    return _read(luks_cases.write_volume(workdir / "caps.img", luks_cases.mutate_json(region, change), SIZE))


CAP_CASES = [
    # (change to keyslot 0's KDF, caps, the words of the refusal)
    ({"memory": 65536}, luks2.KdfCaps(memory_kib=16384),
     (r"keyslot 0: argon2id, 65536 KiB, 4 passes, 1 threads\) needs 65536 KiB of memory, above this site's "
      r"limit of 16384 KiB \(kdf_max_memory_kib\): rebuild the image with a smaller --pbkdf-memory")),
    ({"time": 2**31}, luks2.KdfCaps(time_cost=16),
     r"needs 2147483648 passes, above this site's limit of 16 passes \(kdf_max_time_cost\)"),
    ({"cpus": 16}, luks2.KdfCaps(threads=8), r"needs 16 threads, above this site's limit of 8 \(kdf_max_threads\)"),
]


@pytest.mark.parametrize("kdf, caps, words", CAP_CASES, ids=["memory", "passes", "threads"])
def test_each_argon2_cost_has_its_cap(workdir, plain_volume, kdf, caps, words):
    region, _ = luks_cases.header_region(plain_volume)
    volume = _volume(workdir, region, lambda m: m["keyslots"]["0"]["kdf"].update({"cpus": 1, **kdf}))
    with pytest.raises(PolicyError, match=words):
        luks2.affordable_keyslots(volume, caps)
    assert luks2.affordable_keyslots(volume, luks2.NO_CAPS) == list(volume.keyslots)


def test_pbkdf2_iterations_of_keyslots_and_digests_are_capped(workdir):
    path = reftools.luks_format(workdir / "pbkdf2.img", KEY, SIZE, *luks_cases.KDFS["pbkdf2"], fast=False)
    region, _ = luks_cases.header_region(path)
    volume = _volume(workdir, region, lambda m: m["digests"]["0"].update(iterations=1000))
    caps = luks2.KdfCaps(pbkdf2_iterations=1000)
    assert luks2.affordable_keyslots(volume, caps) == list(volume.keyslots)
    slow_keyslot = _volume(workdir, region, lambda m: m["keyslots"]["0"]["kdf"].update(iterations=2**32 - 1))
    with pytest.raises(PolicyError, match=r"pbkdf2, 4294967295 iterations\) needs 4294967295 PBKDF2 "
                                          r"iterations, above this site's limit of 1000 \(kdf_max_pbkdf2"):
        luks2.affordable_keyslots(slow_keyslot, caps)
    slow_digest = _volume(workdir, region, lambda m: m["digests"]["0"].update(iterations=2**32 - 1))
    with pytest.raises(PolicyError, match=r"volume-key digest 0 needs 4294967295 PBKDF2 iterations, above "
                                          r"this site's limit of 1000 \(kdf_max_pbkdf2_iterations\)"):
        luks2.affordable_keyslots(slow_digest, caps)


def test_caps_skip_only_the_keyslots_above_them(workdir, plain_volume):
    region, _ = luks_cases.header_region(plain_volume)

    def two_keyslots(meta):  # keyslot 1: a PBKDF2 twin of keyslot 0 (same area: only costs matter here)
        meta["keyslots"]["1"] = json.loads(json.dumps(meta["keyslots"]["0"]))
        meta["keyslots"]["1"]["kdf"] = {"type": "pbkdf2", "hash": "sha256", "iterations": 1000,
                                        "salt": meta["keyslots"]["0"]["kdf"]["salt"]}
        meta["digests"]["0"]["keyslots"].append("1")

    volume = _volume(workdir, region, two_keyslots)
    caps = luks2.KdfCaps(memory_kib=1024)
    assert [k.id for k in luks2.affordable_keyslots(volume, caps)] == [1]
    refusal = luks2.no_keyslot_opened(volume, caps)
    assert isinstance(refusal, PolicyError)
    assert str(refusal).startswith("no keyslot within the caps accepts this key; the image's key "
                                   "derivation (keyslot 0: argon2id")
    assert isinstance(luks2.no_keyslot_opened(volume, luks2.NO_CAPS), WrongKeyError)


def test_site_caps_come_from_the_site_configuration():
    from spank_sif.config import SiteConfig
    caps = luks2.site_caps(SiteConfig(kdf_max_memory_kib=1, kdf_max_time_cost=2, kdf_max_threads=3,
                                      kdf_max_pbkdf2_iterations=4))
    assert caps == luks2.KdfCaps(1, 2, 3, 4)


# ---------------------------------------------------------------------------------------------
# Payload: real cryptsetup offline encryption of a squashfs, decrypted back exactly.


@pytest.fixture(scope="module")
def squashfs(workdir):
    return reftools.make_squashfs(workdir / "tree", workdir / "payload.sqfs", luks_cases.PAYLOAD_FILES)


@pytest.mark.parametrize("sector_size", luks_cases.SECTOR_SIZES)
def test_payload_decrypts_to_the_squashfs(workdir, squashfs, sector_size):
    path = reftools.luks_encrypt_payload(squashfs, workdir / f"payload-{sector_size}.luks", KEY,
                                         "--sector-size", str(sector_size))
    plain = squashfs.read_bytes()
    fd, volume = _open(path)
    try:
        assert volume.segment.sector_size == sector_size
        assert volume.segment.offset == 16 << 20 and volume.segment.size == len(plain)
        volume_key = reftools.volume_key(path, KEY)
        data = luks2.decrypt_sectors(volume, fd, volume_key, 0, volume.segment.sectors)
        assert data[:4] == b"hsqs" and data == plain
        middle = luks2.decrypt_sectors(volume, fd, volume_key, 1, 2)
        assert middle == plain[sector_size:3 * sector_size]
        with pytest.raises(ImageError, match="outside the data segment"):
            luks2.decrypt_sectors(volume, fd, volume_key, volume.segment.sectors, 1)
    finally:
        os.close(fd)


@pytest.mark.parametrize("key_size", [32, 64])
@pytest.mark.parametrize("sector_size", luks_cases.SECTOR_SIZES)
@pytest.mark.parametrize("first_iv", [0, 7, 2**64 - 3])  # the last one wraps like plain64 does
def test_xts_matches_the_library_per_sector(key_size, sector_size, first_iv):
    """The two-pass ECB XTS equals one library XTS context per sector (independent implementation)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    key = hashlib.sha512(b"%d" % key_size).digest()[:key_size]
    data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(3 * sector_size // 32))
    step = sector_size // 512
    expected = b"".join(
        Cipher(algorithms.AES(key), modes.XTS(((first_iv + n * step) % 2**64).to_bytes(16, "little")))
        .decryptor().update(data[n * sector_size:(n + 1) * sector_size]) for n in range(3))
    assert luks2._xts_decrypt(key, data, sector_size, first_iv) == expected


# ---------------------------------------------------------------------------------------------
# Hostile headers: a catalogue, then fuzzing. Always a typed error, never a traceback.


def _read(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return luks2.read_luks2(fd)
    finally:
        os.close(fd)


def _flip(region, offset):
    out = bytearray(region)
    out[offset] ^= 0x01
    return out


def _set(path, value):
    def change(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return change


DELETE = object()
JSON_CASES = [
    (("keyslots", "0", "kdf", "memory"), 2**40, ImageError, "keyslots.0.kdf.memory"),
    (("keyslots", "0", "kdf", "memory"), 7, ImageError, "outside"),
    (("keyslots", "0", "kdf", "time"), 0, ImageError, "keyslots.0.kdf.time"),
    (("keyslots", "0", "kdf", "cpus"), 10**6, ImageError, "keyslots.0.kdf.cpus"),
    (("keyslots", "0", "kdf", "type"), "scrypt", UnsupportedImageError, "scrypt"),
    (("keyslots", "0", "kdf", "salt"), "not base64!", ImageError, "salt"),
    (("keyslots", "0", "af", "stripes"), 10**9, ImageError, "stripes"),
    (("keyslots", "0", "key_size"), 10**6, ImageError, "key_size"),
    (("keyslots", "0", "key_size"), True, ImageError, "key_size"),
    (("keyslots", "0", "area", "offset"), "99999999999999", ImageError, "area"),
    (("keyslots", "0", "area", "size"), "-1", ImageError, "area.size"),
    (("keyslots", "0", "area", "encryption"), "serpent-xts-plain64", UnsupportedImageError, "serpent"),
    (("keyslots", "0", "area", "key_size"), 48, UnsupportedImageError, "AES-XTS"),
    (("keyslots", "0", "priority"), 7, ImageError, "priority"),
    (("keyslots", "0", "type"), "luks3", UnsupportedImageError, "luks3"),
    (("keyslots", "0"), [], ImageError, "keyslots.0"),
    (("keyslots", "4000"), {}, ImageError, "invalid id"),
    (("segments", "0", "offset"), str(2**64), ImageError, "segments.0.offset"),
    (("segments", "0", "offset"), "4096", ImageError, "overlaps"),
    (("segments", "0", "size"), "1e9", ImageError, "segments.0.size"),
    (("segments", "0", "sector_size"), 1000, ImageError, "sector_size"),
    (("segments", "0", "sector_size"), 65536, ImageError, "sector_size"),
    (("segments", "0", "encryption"), "aes-cbc-essiv:sha256", UnsupportedImageError, "aes-cbc"),
    (("segments", "1"), {"type": "linear"}, UnsupportedImageError, "segments"),
    (("segments",), DELETE, ImageError, "segments"),
    (("digests", "0", "iterations"), 0, ImageError, "iterations"),
    (("digests", "0", "type"), "argon2", UnsupportedImageError, "argon2"),
    (("digests", "0", "digest"), "", ImageError, "digest"),
    (("config", "json_size"), "4096", ImageError, "json_size"),
    (("config", "keyslots_size"), str(2**63), ImageError, "keyslots_size"),
    (("config", "requirements"), {"mandatory": ["online-reencrypt-v2"]}, UnsupportedImageError,
     "reencryption"),
]


@pytest.mark.parametrize("path, value, error, words", JSON_CASES,
                         ids=[".".join(c[0]) + "=" + str(c[1])[:12] for c in JSON_CASES])
def test_malformed_metadata(workdir, plain_volume, path, value, error, words):
    region, _ = luks_cases.header_region(plain_volume)
    bad = luks_cases.write_volume(workdir / "bad.img", luks_cases.mutate_json(region, _set(path, value)),
                                  SIZE)
    with pytest.raises(error, match=words) as caught:
        _read(bad)
    assert "\n" not in str(caught.value)


RAW_CASES = {
    "not JSON": b"{keyslots: nope",
    "JSON array": b"[1, 2, 3]",
    "deep nesting": b"[" * 100000,
    "huge number": b'{"config": {"json_size": ' + b"9" * 5000 + b"}}",
    "not UTF-8": b'{"\xff": 1}',
    "empty": b"",
}


@pytest.mark.parametrize("name", RAW_CASES)
def test_malformed_json_text(workdir, plain_volume, name):
    region, _ = luks_cases.header_region(plain_volume)
    luks_cases.set_metadata(region, RAW_CASES[name])
    with pytest.raises(ImageError, match="JSON|json_size|config"):
        _read(luks_cases.write_volume(workdir / "bad.img", region, SIZE))


def test_damaged_primary_falls_back_to_the_secondary(workdir, plain_volume):
    region, hdr_size = luks_cases.header_region(plain_volume)
    for offset in (100, 448, 5000):  # label, checksum, JSON area
        volume = _read(luks_cases.write_volume(workdir / "half.img", _flip(region, offset), SIZE))
        assert volume.header_copy == "secondary"
        assert volume.uuid == _read(plain_volume).uuid


@pytest.mark.parametrize("where", ["binary header", "JSON area"])
def test_both_copies_damaged(workdir, plain_volume, where):
    region, hdr_size = luks_cases.header_region(plain_volume)
    offset = 200 if where == "binary header" else 6000
    bad = _flip(_flip(region, offset), hdr_size + offset)
    with pytest.raises(ImageError, match="checksum mismatch"):
        _read(luks_cases.write_volume(workdir / "bad.img", bad, SIZE))


HEADER_CASES = {
    "wrong magic": (0, b"LUKZ", "not a LUKS2 volume"),
    "LUKS1": (6, b"\x00\x01", "version 1"),
    "header size": (8, (12345).to_bytes(8, "big"), "invalid header size"),
    "checksum algorithm": (72, b"md4\0", "unsupported checksum"),
    "header offset": (256, (4096).to_bytes(8, "big"), "claims offset"),
}


@pytest.mark.parametrize("name", HEADER_CASES)
def test_malformed_binary_header(workdir, plain_volume, name):
    offset, data, words = HEADER_CASES[name]
    region, hdr_size = luks_cases.header_region(plain_volume)
    for base in (0, hdr_size):  # both copies, re-checksummed: only the field is wrong
        region[base + offset:base + offset + len(data)] = data
        if name != "wrong magic" or base == 0:
            luks_cases.fix_checksum(region, base // hdr_size)
    if name == "wrong magic":
        region[hdr_size:hdr_size + 4] = b"XXXX"
    with pytest.raises(ImageError, match=words):
        _read(luks_cases.write_volume(workdir / "bad.img", region, SIZE))


@pytest.mark.parametrize("size", [0, 100, 20000, 40000])
def test_truncated_volume(workdir, plain_volume, size):
    region, _ = luks_cases.header_region(plain_volume)
    path = workdir / "short.img"
    path.write_bytes(bytes(region[:size]))
    with pytest.raises(ImageError):
        _read(path)


def test_volume_smaller_than_its_segment_offset(workdir, plain_volume):
    region, _ = luks_cases.header_region(plain_volume)
    with pytest.raises(ImageError, match="segments.0.offset|keyslots_size"):
        _read(luks_cases.write_volume(workdir / "small.img", region, 1 << 20))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 32767), st.integers(1, 255)), min_size=1, max_size=8))
def test_fuzz_binary_headers(plain_volume, tmp_path_factory, flips):
    region, _ = luks_cases.header_region(plain_volume)
    for offset, mask in flips:
        region[offset] ^= mask
    for copy in (0, 1):  # half the time the damage is "valid" (re-checksummed)
        if flips[0][1] & 1:
            luks_cases.fix_checksum(region, copy)
    _expect_typed(tmp_path_factory, region)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30)
    | st.sampled_from(["dynamic", "0", "512", "4096", "16777216", "99999999999999999999", "luks2",
                       "aes-xts-plain64", "argon2id", "pbkdf2", "sha256", "AAAAAAAAAAAAAAAAAAAAAA=="]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
PATHS = st.sampled_from([
    ("keyslots", "0", "kdf", key) for key in ("type", "time", "memory", "cpus", "salt", "iterations", "hash")
] + [("keyslots", "0", "area", key) for key in ("offset", "size", "encryption", "key_size", "type")] + [
    ("keyslots", "0", "af", key) for key in ("stripes", "hash", "type")] + [
    ("keyslots", "0", key) for key in ("key_size", "priority", "type")] + [
    ("segments", "0", key) for key in ("offset", "size", "sector_size", "iv_tweak", "encryption")] + [
    ("digests", "0", key) for key in ("keyslots", "segments", "salt", "digest", "iterations", "hash")] + [
    ("config", key) for key in ("json_size", "keyslots_size", "requirements")] + [
    ("keyslots",), ("segments",), ("digests",), ("config",), ("tokens",), ("keyslots", "1")])


@FUZZ
@given(changes=st.lists(st.tuples(PATHS, JSON_VALUES), min_size=1, max_size=4))
def test_fuzz_metadata(plain_volume, tmp_path_factory, changes):
    region, _ = luks_cases.header_region(plain_volume)

    def change(meta):
        for path, value in changes:
            node = meta
            for key in path[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node[path[-1]] = value

    _expect_typed(tmp_path_factory, luks_cases.mutate_json(region, change))


def _expect_typed(tmp_path_factory, region):
    path = luks_cases.write_volume(tmp_path_factory.mktemp("fuzz") / "v.img", region, SIZE)
    try:
        _read(path)
    except SifError as err:
        assert "\n" not in str(err) and str(err)
    finally:
        path.unlink()
