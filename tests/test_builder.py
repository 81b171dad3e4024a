"""The rootless builder (and the demo on top of it): images that the real cryptsetup and the reference
SIF implementation accept, laid out as Apptainer's builder lays them out, made by an ordinary user."""
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import reftools
from spank_sif import builder, keys, luks2, sif

REPO = Path(__file__).resolve().parent.parent
FAST = ("--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768")


@pytest.fixture(scope="module")
def squashfs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rootfs")
    return reftools.make_squashfs(d / "tree", d / "rootfs.sqfs",
                                  {"hello.txt": b"hello\n", "blob.bin": os.urandom(300_000)})


def _partition(image: Path, tmp_path: Path):
    fd = os.open(image, os.O_RDONLY)
    try:
        img = sif.read_sif(fd)
        part = img.primary_partition()
        messages = [img.read_object(fd, m, 1 << 16) for m in img.crypto_messages(part)]
    finally:
        os.close(fd)
    volume = tmp_path / "partition.luks"
    with open(image, "rb") as f:
        f.seek(part.offset)
        volume.write_bytes(f.read(part.size))
    return part, volume, messages


def _check_volume(volume: Path, key: bytes, squashfs: Path):
    # The real cryptsetup accepts the key...
    done = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--disable-locks", "--key-file", "-",
                           str(volume)], input=key, capture_output=True)
    assert done.returncode == 0, done.stderr
    # ...the layout is Apptainer's (cryptsetup >= 2.1): 16 MiB header, then exactly the squashfs...
    payload = squashfs.read_bytes()
    assert volume.stat().st_size == len(payload) + 16 * 1024 * 1024
    fd = os.open(volume, os.O_RDONLY)
    try:
        vol = luks2.read_luks2(fd)
        assert vol.segment.offset == 16 * 1024 * 1024
        # ...and the data segment decrypts (volume key from cryptsetup itself) to the squashfs.
        vk = reftools.volume_key(volume, key)
        n = len(payload) // vol.segment.sector_size
        assert luks2.decrypt_sectors(vol, fd, vk, 0, n) == payload
    finally:
        os.close(fd)


def test_passphrase_image(tmp_path, squashfs):
    out = builder.build_encrypted_image(str(squashfs), str(tmp_path / "p.sif"), passphrase=b"pass word\n",
                                        deffile=b"Bootstrap: scratch\n", pbkdf_args=FAST)
    part, volume, messages = _partition(Path(out.path), tmp_path)
    assert (part.fs_type, part.part_type, messages) == (sif.FsType.ENCRYPTED_SQUASHFS, sif.PartType.PRIMSYS, [])
    _check_volume(volume, b"pass word\n", squashfs)
    siftool, _ = reftools.reftools()
    listing = reftools.run(siftool, "list", out.path).stdout.decode()
    assert "Partition (Encrypted squashFS" in listing or "Encrypted" in listing, listing


def test_pem_image(tmp_path, squashfs):
    private, public = keys.generate_key_pair(2048)
    out = builder.build_encrypted_image(str(squashfs), str(tmp_path / "k.sif"), public_key_pem=public,
                                        pbkdf_args=FAST)
    part, volume, messages = _partition(Path(out.path), tmp_path)
    assert len(messages) == 1
    with keys.unwrap_key(keys.load_private_key(private, "test"), messages[0]) as luks_key:
        assert len(luks_key) == 64
        _check_volume(volume, bytes(luks_key.value), squashfs)


def _others_can_run(python: str) -> bool:
    """Can a user with no group in common reach and run this interpreter (and its venv)?"""
    path = Path(python)
    dirs = list(path.parents) + list(path.resolve().parents)
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and os.stat(path).st_mode & 0o005 == 0o005


def test_builds_as_an_ordinary_user(tmp_path, squashfs):
    """No root needed: run the builder as 'nobody' in a directory it owns."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user")
    if not _others_can_run(sys.executable):
        pytest.skip("this Python is not usable by other users; scripts/test.sh runs the world-readable one")
    work = Path(tempfile.mkdtemp(prefix="spank-sif-builder-"))
    os.chmod(work, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(work, nobody.pw_uid, nobody.pw_gid)
    (work / "rootfs.sqfs").write_bytes(squashfs.read_bytes())
    code = ("import sys; from spank_sif import builder; "
            "builder.build_encrypted_image(sys.argv[1], sys.argv[2], passphrase=b'x', "
            "pbkdf_args=('--pbkdf-force-iterations', '4', '--pbkdf-memory', '32768'))")
    done = subprocess.run(["setpriv", "--reuid", str(nobody.pw_uid), "--regid", str(nobody.pw_gid),
                           "--clear-groups", sys.executable, "-c", code, str(work / "rootfs.sqfs"),
                           str(work / "out.sif")], capture_output=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr.decode()
    assert (work / "out.sif").stat().st_uid == nobody.pw_uid
    try:
        _, volume, _ = _partition(work / "out.sif", tmp_path)
        _check_volume(volume, b"x", work / "rootfs.sqfs")
    finally:
        shutil.rmtree(work)


def test_failure_leaves_nothing(tmp_path):
    bad = tmp_path / "empty.sqfs"
    bad.write_bytes(b"")
    with pytest.raises(Exception):
        builder.build_encrypted_image(str(bad), str(tmp_path / "x.sif"), passphrase=b"x",
                                      pbkdf_args=("--pbkdf-memory", "1"))  # cryptsetup refuses it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqfs"]


def test_demo_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "spank_sif", "demo", str(tmp_path / "demo"), "--fast-kdf"],
                          capture_output=True, cwd=REPO)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "demo succeeded" in out and "(exit 2)" in out and out.count("(exit 0)") == 4
    assert "no keyslot of the image accepts this key" in done.stderr.decode()
    assert os.stat(tmp_path / "demo" / "demo.pem").st_mode & 0o777 == 0o600
