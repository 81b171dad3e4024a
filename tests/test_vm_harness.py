"""The VM harness itself: dm-crypt really works where vm tests run, and the host reports what the VM saw."""
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from vm.capability import dm_targets, dmcrypt_missing, in_vm


def sh(*argv) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.vm
def test_dm_crypt_opens_a_reference_image_and_the_mount_shows_its_files(ref_images, tmp_path):
    assert dmcrypt_missing() is None and Path("/dev/mapper/control").exists()
    image = ref_images.fast_pass_4k
    data = image.read_bytes()
    offset = data.find(b"LUKS\xba\xbe")  # the partition starts with the LUKS2 header (4 KiB aligned)
    assert offset > 0 and offset % 4096 == 0
    loop = sh("losetup", "--read-only", "--find", "--show", "--offset", offset, image)
    name = f"harness-{os.getpid()}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh("cryptsetup", "open", "--readonly", "--type", "luks2", "--key-file", ref_images.pass_file, loop, name)
        try:
            sh("mount", "-t", "squashfs", "-o", "ro", f"/dev/mapper/{name}", mnt)
            try:
                assert (mnt / "hello.txt").read_bytes() == ref_images.hello
                blob = (mnt / ref_images.blob_path).read_bytes()
                assert hashlib.sha256(blob).hexdigest() == ref_images.blob_sha256
            finally:
                sh("umount", mnt)
        finally:
            sh("cryptsetup", "close", name)
    finally:
        sh("losetup", "-d", loop)
