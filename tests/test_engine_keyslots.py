"""A key is tried against the keyslots libcryptsetup would try, in its order (luks2.keyslot_order,
which decides for both the plugin and ``verify-key``): "ignore" keyslots never, "prefer" first. Volumes from the
real cryptsetup; the activation itself is exercised in the VM tests."""
import os
import subprocess

import reftools
from spank_sif import libcryptsetup, luks2


def _cryptsetup(*args, key: bytes):
    subprocess.run(["cryptsetup", *args], input=key, check=True, capture_output=True)


def test_keyslots_are_tried_in_cryptsetups_order(tmp_path):
    vol = reftools.luks_format(tmp_path / "v.luks", b"zero", 20 << 20)
    for slot, new in ((1, b"one"), (2, b"two")):
        newkey = tmp_path / f"k{slot}"
        newkey.write_bytes(new)
        _cryptsetup("luksAddKey", "--batch-mode", *reftools.FAST_PBKDF, "--key-slot", str(slot),
                    "--key-file", "-", str(vol), str(newkey), key=b"zero")
    _cryptsetup("config", "--priority", "ignore", "--key-slot", "0", str(vol), key=b"")
    _cryptsetup("config", "--priority", "prefer", "--key-slot", "2", str(vol), key=b"")
    fd = os.open(vol, os.O_RDONLY)
    try:
        with libcryptsetup.Header(fd, 0, 20 << 20, luks2.KdfCaps(memory_kib=1 << 20)) as header:
            assert [k.id for k in header.allowed] == [2, 1]
            assert [k.id for k in luks2.keyslot_order(header.volume)] == [2, 1]
    finally:
        os.close(fd)
