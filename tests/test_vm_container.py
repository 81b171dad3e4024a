"""--sif-container on an encrypted image, through a real Slurm, under a kernel with dm-crypt (the VM
harness), as the ordinary user sifuser. Few tests, each doing much: everything runs under emulation.
"""
import os
import pwd
import shutil
from pathlib import Path

import pytest

import container_images
import reftools
from slurm.fixtures import (cluster, mount_point, sif_lines, slurm_cluster,  # noqa: F401
                            wait_no_leftovers, write_image)
from spank_sif import sif

pytestmark = [pytest.mark.vm, pytest.mark.slurm, pytest.mark.root]

USER = "sifuser"
PASSPHRASE = b"container passphrase"
KEY_ENV = {"APPTAINER_ENCRYPTION_PASSPHRASE": PASSPHRASE.decode()}
VAR, VALUE = container_images.IMAGE_VARIABLE


def encrypt(squashfs: Path, volume: Path, passphrase: bytes) -> Path:
    """A LUKS2 volume holding ``squashfs``, made as Apptainer's builder makes it (and as the
    reference images are): the volume is the squashfs plus 16 MiB, formatted by the real cryptsetup
    on a loop device (cheap KDF), the squashfs written through dm-crypt."""
    keyfile = volume.with_suffix(".key")
    keyfile.write_bytes(passphrase)
    with open(volume, "wb") as f:
        f.truncate(squashfs.stat().st_size + 16 * 1024 * 1024)
    loop = reftools.run("losetup", "-f", "--show", volume, text=True).stdout.strip()
    name = f"container-build-{os.getpid()}"
    try:
        reftools.run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *reftools.FAST_PBKDF,
                     "--key-file", keyfile, loop)
        reftools.run("cryptsetup", "open", "--type", "luks2", "--key-file", keyfile, loop, name)
        try:
            reftools.run("dd", f"if={squashfs}", f"of=/dev/mapper/{name}", "bs=1M", "status=none", "conv=fsync")
        finally:
            reftools.run("cryptsetup", "close", name)
    finally:
        reftools.run("losetup", "-d", loop)
        keyfile.unlink()
    return volume


@pytest.fixture(scope="module")
def enc_container(slurm_cluster):
    """The busybox container image, encrypted (LUKS2, passphrase)."""
    d = slurm_cluster.root / "enc-container"
    d.mkdir(mode=0o755, exist_ok=True)
    squashfs = container_images.build_squashfs(d, "container")
    volume = encrypt(squashfs, d / "payload.luks", PASSPHRASE)
    return write_image(d / "enc.sif", volume.read_bytes(), sif.FsType.ENCRYPTED_SQUASHFS)


@pytest.fixture
def submit_dir(enc_container):
    """The user's project directory holding enc.sif and an input file."""
    entry = pwd.getpwnam(USER)
    path = Path(entry.pw_dir) / "project"
    path.mkdir(exist_ok=True)
    shutil.copyfile(enc_container, path / "enc.sif")
    (path / "input.txt").write_text("input in the submit directory\n")
    for p in (path, path / "enc.sif", path / "input.txt"):
        os.chown(p, entry.pw_uid, entry.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_encrypted_container_as_an_ordinary_user(cluster, submit_dir):
    def srun(*argv, container=True):
        return cluster.run(["srun", "--sif-image=enc.sif", *(["--sif-container"] if container else []), *argv],
                           env=KEY_ENV, cwd=submit_dir)

    out = srun("cat", "/etc/os-release")
    assert out.returncode == 0, out.stderr
    assert out.stdout == container_images.OS_RELEASE.decode()

    script = ('id -un; echo "var=$' + VAR + '"; hello-sif; pwd; cat input.txt; env; '
              'touch /new-file 2>&1; true')
    out = srun("sh", "-c", script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:5] == [USER, f"var={VALUE}", container_images.HELLO_OUTPUT, str(submit_dir),
                         "input in the submit directory"], out.stdout
    assert "_ENCRYPTION_" not in out.stdout and PASSPHRASE.decode() not in out.stdout
    assert "touch: /new-file: Read-only file system" in out.stdout
    assert sif_lines(out.stderr) == []

    # Without the option: mount mode, exactly as before.
    out = srun("sh", "-c", 'cat "$SIF_IMAGE_ROOT/etc/os-release"; echo "root=$SIF_IMAGE_ROOT"; '
               'test -e /etc/debian_version && echo on-the-host', container=False)
    assert out.returncode == 0, out.stderr
    assert container_images.OS_RELEASE.decode() in out.stdout
    assert f"root={mount_point(cluster)}" in out.stdout and "on-the-host" in out.stdout
    assert PASSPHRASE.decode() not in cluster.log("slurmd")
    assert wait_no_leftovers(cluster) == []
