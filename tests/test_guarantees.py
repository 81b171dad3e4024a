"""Guarantees of docs/security-model.md checked on the host (loop + squashfs, no dm-crypt): each
test fails if the protection it names is removed (docs/testing.md records which removal each one
caught)."""
import contextlib
import os
import shutil
import subprocess

import pytest

import luks_cases
import reftools
from engine_helpers import USER, ensure_users, leftovers, pem_padded, plain_image, world_dir
from spank_sif import keys, lifecycle, userfiles
from spank_sif.cli import main
from spank_sif.config import SiteConfig


@pytest.fixture
def wd():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ensure_users()
    path = world_dir("sif-guarantees-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _loop_backing_inodes(image_dir) -> dict[str, int]:
    """Loop devices over files of ``image_dir`` and the inode each reads, as losetup reports them."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-INO,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, ino, backing = line.split(None, 2)
        if backing.startswith(str(image_dir)):
            found[name] = int(ino)
    return found


@pytest.mark.root
def test_swapping_the_image_path_for_a_symlink_after_the_open_changes_nothing(wd, tmp_path, monkeypatch):
    """Guarantee 4. The user's image is opened as the user; right after that open, the user swaps
    the path for a symlink to a file only root may read. Everything root does next works on the
    descriptor: the mounted image and the loop device are the user's file, never root's."""
    (wd / "user").mkdir(mode=0o755)
    (wd / "root").mkdir(mode=0o755)
    image = plain_image(wd / "user", {"hello.txt": b"the user's own image\n"})
    secret = plain_image(wd / "root", {"hello.txt": b"a file only root may read\n"})
    secret.chmod(0o600)
    moved = wd / "user" / "moved.sif"
    real_open_as_user = userfiles.open_as_user

    def open_then_swap(path, user, *args, **kwargs):
        fd = real_open_as_user(path, user, *args, **kwargs)
        if path == str(image):  # the race, won by the user at the worst moment for root
            os.rename(image, moved)
            os.symlink(secret, image)
        return fd

    monkeypatch.setattr(userfiles, "open_as_user", open_then_swap)
    config = SiteConfig(state_dir=str(tmp_path / "state"))
    target = tmp_path / "mnt"
    target.mkdir()
    unlocked = lifecycle.unlock(str(image), userfiles.User.from_name(USER), {}, "cli", config)
    try:
        assert os.path.islink(image) and image.read_bytes() == secret.read_bytes()  # the swap happened
        assert set(_loop_backing_inodes(wd).values()) == {os.stat(moved).st_ino}
        lifecycle.mount(unlocked, str(target), private=False)
        assert (target / "hello.txt").read_bytes() == b"the user's own image\n"
    finally:
        lifecycle.release(unlocked, config)
    assert leftovers(moved, tmp_path / "state", target) == [] and leftovers(secret, tmp_path / "state") == []


def test_verify_key_refuses_a_pem_file_above_the_size_cap(tmp_path, monkeypatch, capsys):
    """Guarantee 6, verify-key's path (keys.read_pem; the engine's: tests/test_vm_guarantees.py). A
    working key padded to exactly keys.MAX_PEM_FILE bytes verifies; one byte more is refused in one
    line naming the file and its size (exit 4, a key-material error)."""
    for name in keys.DEFAULT_KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "defaults.yaml").write_bytes(b"")
    monkeypatch.setenv("SPANK_SIF_CONFIG", str(tmp_path / "defaults.yaml"))
    _, sifref = reftools.reftools()
    private, public, luks_key = tmp_path / "key.pem", tmp_path / "key.pub", tmp_path / "luks.key"
    reftools.run(sifref, "genkey", "-priv", private, "-pub", public, "-bits", 2048)
    reftools.run(sifref, "randkey", "-o", luks_key)
    squashfs = reftools.make_squashfs(tmp_path / "tree", tmp_path / "root.sqfs", {"hello.txt": b"hello\n"})
    with contextlib.chdir(tmp_path):  # cryptsetup reencrypt writes a temporary header in its cwd
        volume = reftools.luks_encrypt_payload(squashfs, tmp_path / "volume.luks", luks_key.read_bytes(),
                                               *luks_cases.KDFS["pbkdf2"], fast=False)
    image = reftools.sifref_build(tmp_path / "pem.sif", volume, pem_pub=public, key=luks_key)
    at_cap, above = tmp_path / "at-cap.pem", tmp_path / "above-cap.pem"
    at_cap.write_bytes(pem_padded(private.read_bytes(), keys.MAX_PEM_FILE))
    above.write_bytes(pem_padded(private.read_bytes(), keys.MAX_PEM_FILE + 1))
    assert main(["verify-key", str(image), "--pem-path", str(at_cap)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["verify-key", str(image), "--pem-path", str(above)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("spank-sif: ") and err.count("\n") == 1, err
    assert str(above) in err and f"{keys.MAX_PEM_FILE + 1} bytes is too big for a key file" in err, err
