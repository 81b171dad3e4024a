"""The rootless builder's parts (spank_sif.builder) and the demo on top of it. The command as users
run it, checked end to end with cryptsetup and the reference SIF library: tests/test_encrypt.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import reftools
from spank_sif import builder, keys, libcryptsetup, luks2, sif
from spank_sif.errors import SystemSetupError, UsageError

REPO = Path(__file__).resolve().parent.parent
CHEAP = builder.make_kdf(memory_kib=32768)


def test_xts_is_dm_crypts_for_any_split(tmp_path):
    """Encrypting chunk by chunk (IVs continuing) is encrypting at once, and the real cryptsetup
    decrypts it (a detached header over the data; cryptsetup's own userspace crypto)."""
    key = os.urandom(64)
    for sector_size in builder.SECTOR_SIZES:
        data = os.urandom(24 * sector_size)
        whole = builder.xts_encrypt(key, data, sector_size, 0)
        cut = 7 * sector_size
        assert whole == (builder.xts_encrypt(key, data[:cut], sector_size, 0)
                         + builder.xts_encrypt(key, data[cut:], sector_size, cut // 512))
        # spank-sif's reader (an independent XTS, over two ECB passes) gets the data back...
        assert luks2._xts_decrypt(key, whole, sector_size, 0) == data
        # ...and so does cryptsetup.
        enc = tmp_path / f"data-{sector_size}"
        enc.write_bytes(whole)
        (tmp_path / "vk").write_bytes(key)
        (tmp_path / "pw").write_bytes(b"x")
        hdr = tmp_path / f"hdr-{sector_size}"
        reftools.run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--disable-locks",
                     "--header", hdr, "--offset", "0", "--sector-size", sector_size, "--key-size", 512,
                     "--volume-key-file", tmp_path / "vk", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
                     1000, "--key-file", tmp_path / "pw", enc)
        reftools.run("cryptsetup", "reencrypt", "--decrypt", "--batch-mode", "--disable-locks",
                     "--force-offline-reencrypt", "--header", hdr, "--key-file", tmp_path / "pw", enc)
        assert enc.read_bytes() == data


def test_kdf_defaults_and_limits():
    assert builder.make_kdf() == builder.Kdf("argon2id", 262144, 4, 1)
    assert builder.make_kdf("pbkdf2") == builder.Kdf("pbkdf2", 0, builder.DEFAULT_PBKDF2_ITERATIONS, 1)
    assert builder.make_kdf(memory_kib=65536, time=6, threads=4).cost == luks2.KdfCost(
        "argon2id", memory_kib=65536, time=6, threads=4)
    assert builder.make_kdf("pbkdf2", time=5000).cryptsetup_args() == [
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "5000"]
    for bad in [dict(time=3), dict(threads=0), dict(threads=5), dict(memory_kib=31), dict(memory_kib=(4 << 20) + 1),
                dict(kind="argon2i"), dict(kind="pbkdf2", memory_kib=65536), dict(kind="pbkdf2", time=999)]:
        with pytest.raises(UsageError):
            builder.make_kdf(**bad)


def _squashfs(tmp_path) -> Path:
    return reftools.make_squashfs(tmp_path / "tree", tmp_path / "rootfs.sqfs", {"hello.txt": b"hello\n"})


def test_in_process_build_and_read_back(tmp_path):
    squashfs = _squashfs(tmp_path)
    seen = []
    built = builder.build_encrypted_image(str(squashfs), str(tmp_path / "out.sif"), passphrase=b"pass word\n",
                                          kdf=CHEAP, sector_size=512, progress=lambda *a: seen.append(a))
    size = squashfs.stat().st_size
    assert (built.mode, built.sector_size, built.data_size, built.dropped) == ("passphrase", 512, size, ())
    assert seen[-1] == (size, size)
    fd = os.open(tmp_path / "out.sif", os.O_RDONLY)
    try:
        part = sif.read_sif(fd).primary_partition()
        with libcryptsetup.Header(fd, part.offset, part.size) as header:  # the node's own key check
            slot, volume_key = header.unlock(b"pass word\n")
        with volume_key:
            assert luks2.decrypt_sectors(header.volume, fd, volume_key, 0, size // 512) == squashfs.read_bytes()
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.sif", "rootfs.sqfs", "tree"]


def test_cryptsetup_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    squashfs = _squashfs(tmp_path)
    with pytest.raises(SystemSetupError, match="cryptsetup could not make the LUKS2 header: .*memory"):
        builder.build_encrypted_image(str(squashfs), str(tmp_path / "x.sif"), passphrase=b"x",
                                      kdf=builder.Kdf("argon2id", 1, 4, 1))  # below cryptsetup's minimum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs.sqfs", "tmp", "tree"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_self_check_catches_wrong_data(tmp_path, monkeypatch):
    """If the data did not decrypt to a squashfs (an encryption bug), nothing is published."""
    squashfs = _squashfs(tmp_path)
    monkeypatch.setattr(builder, "xts_encrypt", lambda key, data, sector_size, iv: bytes(len(data)))
    with pytest.raises(SystemSetupError, match="does not read back as written"):
        builder.build_encrypted_image(str(squashfs), str(tmp_path / "x.sif"), passphrase=b"x", kdf=CHEAP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs.sqfs", "tree"]


def test_pem_mode_key_is_64_random_bytes(tmp_path):
    squashfs = _squashfs(tmp_path)
    private, public = keys.generate_key_pair(2048)
    built = builder.build_encrypted_image(str(squashfs), str(tmp_path / "k.sif"), kdf=CHEAP,
                                          public_key=builder.load_public_key(public, "test"))
    assert built.mode == "pem"
    fd = os.open(tmp_path / "k.sif", os.O_RDONLY)
    try:
        image = sif.read_sif(fd)
        part = image.primary_partition()
        [message] = image.crypto_messages(part)
        with keys.unwrap_key(keys.load_private_key(private, "test"), image.read_object(fd, message, 4096)) as key:
            assert len(key) == 64 and len(set(key.value)) > 8
            with libcryptsetup.Header(fd, part.offset, part.size) as header:
                header.unlock(key)
    finally:
        os.close(fd)


def test_demo_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "spank_sif", "demo", str(tmp_path / "demo"), "--fast-kdf"],
                          capture_output=True, cwd=REPO)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "demo succeeded" in out and "(exit 2)" in out and out.count("(exit 0)") == 6
    assert "$ spank-sif encrypt" in out
    assert "no keyslot of the image accepts this key" in done.stderr.decode()
    assert os.stat(tmp_path / "demo" / "demo.pem").st_mode & 0o777 == 0o600
