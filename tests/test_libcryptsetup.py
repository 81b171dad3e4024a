"""libcryptsetup.Header against the real cryptsetup: volume keys, keyslots, header copies that
disagree, the snapshot as the only input, and every KDF cost refused before it runs (shown from
outside: time, and a memory limit the refused derivation could not have lived with)."""
import json
import os
import shutil

import pytest

import luks_cases
import reftools
from engine_helpers import in_child, measured
from spank_sif import libcryptsetup, luks2
from spank_sif.errors import PolicyError, UnsupportedImageError, WrongKeyError
from spank_sif.secret import Secret

KEY = b"correct horse battery staple"
OTHER_KEY = b"another passphrase"
SIZE = 20 << 20
CAPS = luks2.KdfCaps(memory_kib=1 << 20, time_cost=16, threads=8, pbkdf2_iterations=32_000_000)
GIB = 1 << 30


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("libcryptsetup")


def header(path, caps=CAPS, size=SIZE) -> libcryptsetup.Header:
    fd = os.open(path, os.O_RDONLY)
    try:
        return libcryptsetup.Header(fd, 0, size, caps)
    finally:
        os.close(fd)


def unlock(path, key, caps=CAPS):
    with header(path, caps) as h:
        keyslot, volume_key = h.unlock(key)
        with volume_key:
            return keyslot, bytes(volume_key.value)


def read_luks2(path) -> luks2.Luks2Volume:
    fd = os.open(path, os.O_RDONLY)
    try:
        return luks2.read_luks2(fd)
    finally:
        os.close(fd)


def luks_dump(path) -> dict:
    """The metadata cryptsetup itself uses for the file (locks off: no header repair on the file)."""
    return json.loads(reftools.run("cryptsetup", "luksDump", "--disable-locks", "--dump-json-metadata",
                                   path).stdout)


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
    assert unlock(path, KEY) == (0, reftools.volume_key(path, KEY))
    with pytest.raises(WrongKeyError, match="no keyslot of the image accepts this key"):
        unlock(path, KEY + b"\n")
    with header(path) as h:
        assert h.volume.header_copy == "primary" and h.volume == read_luks2(path)


def test_secret_passphrase_is_accepted(workdir):
    path = reftools.luks_format(workdir / "secret.img", KEY, SIZE)
    with Secret(KEY) as passphrase:
        assert unlock(path, passphrase)[0] == 0


# ---------------------------------------------------------------------------------------------
# Several keyslots: added, killed, priorities.


@pytest.fixture(scope="module")
def multi_volume(workdir):
    """Keyslot 0 (KEY, argon2id), 1 (pbkdf2), 2 (argon2i)."""
    path = reftools.luks_format(workdir / "multi.img", KEY, SIZE)
    keyfile = workdir / "current.key"
    keyfile.write_bytes(KEY)
    for slot, kdf in ((1, "pbkdf2"), (2, "argon2i")):
        new = workdir / f"key{slot}"
        new.write_bytes(b"key %d" % slot)
        reftools.run("cryptsetup", "luksAddKey", "--batch-mode", *luks_cases.KDFS[kdf], "--key-slot", slot,
                     "--key-file", keyfile, path, new)
    return path


@pytest.mark.parametrize("key, slot", [(KEY, 0), (b"key 1", 1), (b"key 2", 2)])
def test_each_keyslot_opens_with_its_key(multi_volume, key, slot):
    assert unlock(multi_volume, key) == (slot, reftools.volume_key(multi_volume, KEY))


def test_killed_keyslot_no_longer_opens(workdir, multi_volume):
    path = shutil.copyfile(multi_volume, workdir / "killed.img")
    reftools.run("cryptsetup", "luksKillSlot", "--batch-mode", path, "1")
    with pytest.raises(WrongKeyError):
        unlock(path, b"key 1")
    assert unlock(path, b"key 2")[0] == 2


def test_priorities_order_and_ignore_like_cryptsetup(workdir, multi_volume):
    path = shutil.copyfile(multi_volume, workdir / "priorities.img")
    reftools.run("cryptsetup", "config", path, "--key-slot", "2", "--priority", "prefer")
    reftools.run("cryptsetup", "config", path, "--key-slot", "1", "--priority", "ignore")
    with header(path) as h:
        assert [k.id for k in h.allowed] == [2, 0]
    keyfile = workdir / "key1"  # cryptsetup itself refuses an ignored keyslot's key unless asked for it
    assert reftools.run("cryptsetup", "open", "--test-passphrase", "--disable-locks", "--key-file", keyfile,
                        path, check=False).returncode == 2
    with pytest.raises(WrongKeyError):
        unlock(path, b"key 1")
    assert unlock(path, b"key 2")[0] == 2


def test_no_usable_keyslot(workdir, multi_volume):
    path = shutil.copyfile(multi_volume, workdir / "ignored.img")
    for slot in "012":
        reftools.run("cryptsetup", "config", path, "--key-slot", slot, "--priority", "ignore")
    with pytest.raises(UnsupportedImageError, match="no usable keyslot"):
        header(path)


# ---------------------------------------------------------------------------------------------
# Header copies that disagree: the copy libcryptsetup chooses on the snapshot is the one cryptsetup
# chooses on the file, and its keys and costs are the ones that count.


@pytest.fixture(scope="module")
def two_keys(workdir):
    """One volume, keyslot 0 opened by KEY, keyslot 1 by OTHER_KEY; (path, header region, metadata
    listing keyslot 0 only, metadata listing keyslot 1 only)."""
    path = reftools.luks_format(workdir / "two-keys.img", KEY, SIZE, *luks_cases.KDFS["pbkdf2"], fast=False)
    (workdir / "key.a").write_bytes(KEY)
    (workdir / "key.b").write_bytes(OTHER_KEY)
    reftools.run("cryptsetup", "luksAddKey", "--batch-mode", *luks_cases.KDFS["pbkdf2"], "--key-slot", "1",
                 "--key-file", workdir / "key.a", path, workdir / "key.b")
    region, _ = luks_cases.header_region(path)
    meta = luks_cases.metadata(region)
    return path, region, luks_cases.only_keyslot(meta, "0"), luks_cases.only_keyslot(meta, "1")


def _disagreeing(two_keys, workdir, name):
    """A volume whose copies disagree as ``name`` says; (path, the key that must open it)."""
    path, region, key_a, key_b = two_keys
    region, seq = bytearray(region), luks_cases.seqid(region, 0)
    if name == "newer-secondary":
        luks_cases.set_copy(region, 0, key_a, seq)
        luks_cases.set_copy(region, 1, key_b, seq + 1)
        expected = OTHER_KEY
    elif name == "newer-primary":
        luks_cases.set_copy(region, 0, key_a, seq + 1)
        luks_cases.set_copy(region, 1, key_b, seq)
        expected = KEY
    elif name == "equal-seqids":
        luks_cases.set_copy(region, 0, key_a, seq)
        luks_cases.set_copy(region, 1, key_b, seq)
        expected = KEY
    elif name == "newer-primary-rejected-token":
        luks_cases.set_copy(region, 0, {**key_b, "tokens": luks_cases.REJECTED_TOKENS}, seq + 5)
        luks_cases.set_copy(region, 1, key_a, seq)
        expected = KEY
    else:  # "corrupt-primary": the newer primary's checksum is wrong
        luks_cases.set_copy(region, 0, key_b, seq + 5)
        luks_cases.set_copy(region, 1, key_a, seq)
        region[5000] ^= 1
        expected = KEY
    out = shutil.copyfile(path, workdir / f"{name}.img")
    luks_cases.patch(out, 0, region)
    return out, expected


DISAGREEING = ["newer-secondary", "newer-primary", "equal-seqids", "newer-primary-rejected-token",
               "corrupt-primary"]


@pytest.mark.parametrize("name", DISAGREEING)
def test_copies_that_disagree_are_resolved_as_cryptsetup_resolves_them(two_keys, workdir, name):
    path, opener = _disagreeing(two_keys, workdir, name)
    with header(path) as h:
        chosen = h.volume
        dump_json = luks_dump(path)
        assert [str(k.id) for k in chosen.keyslots] == list(dump_json["keyslots"])
    wrong = OTHER_KEY if opener == KEY else KEY
    for key, opens in ((opener, True), (wrong, False)):
        tested = reftools.run("cryptsetup", "open", "--test-passphrase", "--disable-locks", "--key-file", "-",
                              path, input=key, check=False)
        assert tested.returncode == (0 if opens else 2), tested.stderr
        if opens:
            assert unlock(path, key)[1] == reftools.volume_key(two_keys[0], KEY)
        else:
            with pytest.raises(WrongKeyError):
                unlock(path, key)


def test_the_file_changing_after_the_snapshot_changes_nothing(two_keys, workdir):
    """Once a Header is made, libcryptsetup reads nothing from the image any more: the file's
    header and keyslot areas rewritten with another volume's (another key) change neither what
    the header says nor which key opens it."""
    path = shutil.copyfile(two_keys[0], workdir / "changing.img")
    other = reftools.luks_format(workdir / "other.img", b"a third key", SIZE, *luks_cases.KDFS["argon2id"],
                                 fast=False)
    fd = os.open(path, os.O_RDONLY)
    try:
        with libcryptsetup.Header(fd, 0, SIZE, CAPS) as h:
            before = h.volume
            luks_cases.patch(path, 0, other.read_bytes()[:16 << 20])
            assert luks_dump(path)["keyslots"]["0"]["kdf"]["type"] == "argon2id"  # the file did change
            keyslot, volume_key = h.unlock(KEY)
            assert (keyslot, bytes(volume_key.value)) == (0, reftools.volume_key(two_keys[0], KEY))
            assert h.volume == before
            with pytest.raises(WrongKeyError):
                h.unlock(b"a third key")
    finally:
        os.close(fd)


def test_an_ordinary_user_can_load_and_check(two_keys, workdir):
    """verify-key runs as the user: no root for the memfd, the load or the key check."""
    from engine_helpers import USER, ensure_users, in_child
    import pwd
    ensure_users()
    fd = os.open(two_keys[0], os.O_RDONLY)
    entry = pwd.getpwnam(USER)

    def as_user():
        os.setgroups([])
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
        with libcryptsetup.Header(fd, 0, SIZE, CAPS) as h:
            return os.geteuid(), h.unlock(OTHER_KEY)[0]

    try:
        assert in_child(as_user) == (0, (entry.pw_uid, 1))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Every cost is refused before anything runs.


def _refusal(path, caps=CAPS):
    """In a child: make the Header (which must refuse) and, if it did not, run the key check."""
    with header(path, caps) as h:
        h.unlock(KEY)
    return "ran"


def test_two_copy_attack_is_refused_before_any_derivation(workdir):
    """The primary copy shows a cheap PBKDF2 keyslot, but holds a token libcryptsetup rejects, so the
    library uses the secondary copy: Argon2id at 4 GiB. Refused, in a child that cannot map even
    1 GiB more than it started with, and in far less time than the derivation takes."""
    path = reftools.luks_format(workdir / "attack.img", KEY, SIZE, *luks_cases.KDFS["pbkdf2"], fast=False)
    region, _ = luks_cases.header_region(path)
    luks_cases.patch(path, 0, luks_cases.hostile_two_copies(region))
    assert read_luks2(path).keyslots[0].kdf.type == "pbkdf2"  # the decoy
    assert luks_dump(path)["keyslots"]["0"]["kdf"]["memory"] == 4194304  # what cryptsetup would run
    status, result, seconds, _ = measured(_refusal, path, headroom=GIB, timeout=120)
    assert status == 1 and result.startswith("PolicyError: the image's key derivation (keyslot 0: argon2id, "
                                             "4194304 KiB"), result
    assert "above this site's limit of 1048576 KiB (kdf_max_memory_kib)" in result
    yardstick = _argon2_seconds(64 << 10) * 64 * 4  # the same derivation at 4 GiB: 64x the memory, 4 passes
    assert seconds < yardstick / 10, (seconds, yardstick)


def _argon2_seconds(memory_kib: int) -> float:
    """What one pass of Argon2id over ``memory_kib`` takes here, timed now (the yardstick)."""
    import time
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    start = time.monotonic()
    Argon2id(salt=b"s" * 16, length=32, iterations=1, lanes=1, memory_cost=memory_kib).derive(b"x")
    return time.monotonic() - start


TIME_CASES = {
    "argon2-passes": ("argon2id", lambda m: m["keyslots"]["0"]["kdf"].update(time=2**31 - 1),
                      r"needs 2147483647 passes, above this site's limit of 16 passes \(kdf_max_time_cost\)"),
    "argon2-passes-read-differently": (  # libcryptsetup reads 2^31 as 2^31 - 1: ambiguous, refused
        "argon2id", lambda m: m["keyslots"]["0"]["kdf"].update(time=2**31),
        (r"ImageError: libcryptsetup would run keyslot 0's key derivation as argon2id, 8192 KiB, 2147483647 "
         r"passes, 1 threads, its metadata says argon2id, 8192 KiB, 2147483648 passes")),
    "pbkdf2-keyslot": ("pbkdf2", lambda m: m["keyslots"]["0"]["kdf"].update(iterations=2**31 - 1),
                       (r"needs 2147483647 PBKDF2 iterations, above this site's limit of 32000000 "
                        r"\(kdf_max_pbkdf2_iterations\)")),
    "pbkdf2-digest": ("argon2id", lambda m: m["digests"]["0"].update(iterations=2**32 - 1),
                      (r"volume-key digest 0 needs 4294967295 PBKDF2 iterations, above this site's limit of "
                       r"32000000 \(kdf_max_pbkdf2_iterations\)")),
}


@pytest.mark.parametrize("name", TIME_CASES)
def test_time_costs_are_refused_before_running(workdir, name):
    """Costs that would run for hours are refused at once (the child is killed after 60 s)."""
    import re
    kdf, change, words = TIME_CASES[name]
    path = reftools.luks_format(workdir / f"{name}.img", KEY, SIZE, *luks_cases.KDFS[kdf], fast=False)
    region, _ = luks_cases.header_region(path)
    luks_cases.patch(path, 0, luks_cases.mutate_json(region, change))
    status, result, seconds, _ = measured(_refusal, path, timeout=60)
    assert status == 1 and result.startswith(("PolicyError", "ImageError")) and re.search(words, result), result
    assert seconds < 10


def test_refused_when_no_keyslot_fits_and_wrong_key_names_the_cap(workdir, multi_volume):
    caps = CAPS._replace(memory_kib=1024)  # keyslots 0 and 2 are Argon2 at 32 and 8 MiB
    assert [k.id for k in header(multi_volume, caps).allowed] == [1]
    assert unlock(multi_volume, b"key 1", caps)[0] == 1
    with pytest.raises(PolicyError, match="no keyslot within the caps accepts this key; the image's key "
                                          r"derivation \(keyslot 0: argon2id, 32768 KiB"):
        unlock(multi_volume, KEY, caps)
    with pytest.raises(PolicyError, match=r"keyslot 0: .* needs 32768 KiB of memory, above this site's limit "
                                          r"of 1024 KiB"):
        header(reftools.luks_format(workdir / "one.img", KEY, SIZE), caps)


def test_a_file_size_limit_is_one_line(workdir):
    """The snapshot is a sparse file of the volume's size; a user's ``ulimit -f`` below it is said."""
    import resource
    path = reftools.luks_format(workdir / "limited.img", KEY, SIZE)

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        header(path)

    status, result = in_child(limited)
    assert status == 1 and result.startswith("SystemSetupError: cannot make a 20971520-byte copy of the "
                                             "image's LUKS2 header in memory: File too large"), result
