"""Guarantees of docs/security-model.md checked on the host kernel (loop + squashfs, no dm-crypt):
each test fails if the protection it names is removed (docs/testing.md records which removal each
one caught)."""
import os
import shutil
import subprocess

import pytest

from engine_helpers import USER, ensure_users, leftovers, plain_image, world_dir
from spank_sif import lifecycle, userfiles
from spank_sif.config import SiteConfig

pytestmark = pytest.mark.root


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
