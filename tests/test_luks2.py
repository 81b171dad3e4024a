"""LUKS2 in userspace against the real cryptsetup: volume keys, payloads, priorities, hostile headers."""
import hashlib
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import luks_cases
import reftools
from spank_sif import luks2
from spank_sif.errors import ImageError, PolicyError, SifError, UnsupportedImageError, WrongKeyError
from spank_sif.secret import Secret

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
# Volume keys: every keyslot kind, both sector sizes, key sizes and hashes, equal to cryptsetup's.

VOLUME_CASES = {
    **{f"{kdf}-{sector}": luks_cases.cryptsetup_args(kdf, sector)
       for kdf in luks_cases.KDFS for sector in luks_cases.SECTOR_SIZES},
    "argon2id-2-threads": [*luks_cases.KDFS["argon2id"][:-1], "2"],
    "pbkdf2-sha512": [*luks_cases.KDFS["pbkdf2"], "--hash", "sha512"],
    "xts-256-bit-key": [*luks_cases.KDFS["pbkdf2"], "--key-size", "256"],
}


@pytest.mark.parametrize("name", VOLUME_CASES)
def test_volume_key_matches_cryptsetup(workdir, name):
    path = reftools.luks_format(workdir / f"{name}.img", KEY, SIZE, *VOLUME_CASES[name], fast=False)
    fd, volume = _open(path)
    try:
        keyslot, volume_key = luks2.unlock(volume, fd, KEY)
        assert keyslot == 0
        assert bytes(volume_key.value) == reftools.volume_key(path, KEY)
        with pytest.raises(WrongKeyError, match="no keyslot of the image accepts this key"):
            luks2.unlock(volume, fd, KEY + b"\n")
    finally:
        os.close(fd)
    dump = reftools.run("cryptsetup", "luksDump", "--dump-json-metadata", path).stdout
    slot = json.loads(dump)["keyslots"]["0"]
    kdf = volume.keyslots[0].kdf
    assert kdf.type == slot["kdf"]["type"]
    if kdf.type == "pbkdf2":
        assert (kdf.iterations, kdf.memory_kib) == (slot["kdf"]["iterations"], 0)
    else:
        assert (kdf.memory_kib, kdf.time, kdf.threads) == (slot["kdf"]["memory"], slot["kdf"]["time"],
                                                          slot["kdf"]["cpus"])
    assert volume.segment.sector_size == json.loads(dump)["segments"]["0"]["sector_size"]


def test_secret_passphrase_is_accepted(plain_volume):
    fd, volume = _open(plain_volume)
    try:
        with Secret(KEY) as passphrase:
            assert luks2.unlock(volume, fd, passphrase)[0] == 0
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Several keyslots: added, killed, priorities.


@pytest.fixture(scope="module")
def multi_volume(workdir):
    """Keyslot 0 (KEY, argon2id), 1 (pbkdf2), 2 (argon2i); then tests change priorities/kill slots."""
    path = reftools.luks_format(workdir / "multi.img", KEY, SIZE)
    for slot, kdf in ((1, "pbkdf2"), (2, "argon2i")):
        new = workdir / f"key{slot}"
        new.write_bytes(b"key %d" % slot)
        reftools.run("cryptsetup", "luksAddKey", "--batch-mode", *luks_cases.KDFS[kdf], "--key-slot", slot,
                     "--key-file", _keyfile(workdir, KEY), path, new)
    return path


def _keyfile(workdir, key):
    path = workdir / "current.key"
    path.write_bytes(key)
    return path


def _copy(src, dst):
    shutil.copyfile(src, dst)
    return dst


@pytest.mark.parametrize("key, slot", [(KEY, 0), (b"key 1", 1), (b"key 2", 2)])
def test_each_keyslot_opens_with_its_key(multi_volume, key, slot):
    fd, volume = _open(multi_volume)
    try:
        found, volume_key = luks2.unlock(volume, fd, key)
    finally:
        os.close(fd)
    assert found == slot
    assert bytes(volume_key.value) == reftools.volume_key(multi_volume, KEY)


def test_killed_keyslot_no_longer_opens(workdir, multi_volume):
    path = _copy(multi_volume, workdir / "killed.img")
    reftools.run("cryptsetup", "luksKillSlot", "--batch-mode", path, "1")
    fd, volume = _open(path)
    try:
        assert [k.id for k in volume.keyslots] == [0, 2]
        with pytest.raises(WrongKeyError):
            luks2.unlock(volume, fd, b"key 1")
        assert luks2.unlock(volume, fd, b"key 2")[0] == 2
    finally:
        os.close(fd)


def test_priorities_order_and_ignore_like_cryptsetup(workdir, multi_volume):
    path = _copy(multi_volume, workdir / "priorities.img")
    reftools.run("cryptsetup", "config", path, "--key-slot", "2", "--priority", "prefer")
    reftools.run("cryptsetup", "config", path, "--key-slot", "1", "--priority", "ignore")
    fd, volume = _open(path)
    try:
        assert [k.id for k in luks2.keyslot_order(volume)] == [2, 0]
        # cryptsetup itself refuses the key of an ignored keyslot unless asked for that keyslot.
        assert reftools.run("cryptsetup", "open", "--test-passphrase", "--key-file",
                            _keyfile(workdir, b"key 1"), path, check=False).returncode == 2
        with pytest.raises(WrongKeyError):
            luks2.unlock(volume, fd, b"key 1")
        assert luks2.unlock(volume, fd, b"key 2")[0] == 2
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The KDF memory cap is checked before any KDF runs.


@pytest.fixture
def kdf_calls(monkeypatch):
    """Records which keyslots had their KDF run (the real KDF still runs)."""
    calls, real = [], luks2.derive_key

    def spy(keyslot, passphrase):
        calls.append(keyslot.id)
        return real(keyslot, passphrase)

    monkeypatch.setattr(luks2, "derive_key", spy)
    return calls


def test_kdf_cap_refuses_before_running_the_kdf(plain_volume, kdf_calls):
    fd, volume = _open(plain_volume)
    try:
        with pytest.raises(PolicyError, match=r"keyslot 0: .* needs 32768 KiB of memory, above this site's limit of 16384 KiB"):
            luks2.unlock(volume, fd, KEY, max_kdf_memory_kib=16384)
        assert kdf_calls == []
        assert luks2.unlock(volume, fd, KEY, max_kdf_memory_kib=32768)[0] == 0
    finally:
        os.close(fd)


def test_kdf_cap_skips_only_the_keyslots_above_it(multi_volume, kdf_calls):
    fd, volume = _open(multi_volume)
    try:
        assert luks2.unlock(volume, fd, b"key 1", max_kdf_memory_kib=1024)[0] == 1
        assert kdf_calls == [1]
        with pytest.raises(PolicyError, match="no keyslot within the cap accepts this key"):
            luks2.unlock(volume, fd, KEY, max_kdf_memory_kib=1024)
    finally:
        os.close(fd)


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
        _, volume_key = luks2.unlock(volume, fd, KEY)
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

    try:
        region = luks_cases.mutate_json(region, change)
    except ValueError:  # json.dumps of NaN-free floats only fails on nothing; keep hypothesis honest
        return
    _expect_typed(tmp_path_factory, region)


def _expect_typed(tmp_path_factory, region):
    path = luks_cases.write_volume(tmp_path_factory.mktemp("fuzz") / "v.img", region, SIZE)
    try:
        _read(path)
    except SifError as err:
        assert "\n" not in str(err) and str(err)
    finally:
        path.unlink()
