"""Loop devices by ioctl: offset, size limit, read-only, autoclear (loop.py), on the host kernel."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest

from engine_helpers import attached_loops, loops_backed_by, world_dir
from spank_sif import loop

pytestmark = pytest.mark.root

HEAD, BODY, TAIL = 8192, 3 * 1024 * 1024, 4096


@pytest.fixture
def backing():
    if os.geteuid() != 0 or not os.path.exists(loop.LOOP_CONTROL):
        pytest.skip("needs root and the loop driver")
    d = world_dir()
    body = os.urandom(BODY)
    path = d / "backing.img"
    path.write_bytes(os.urandom(HEAD) + body + os.urandom(TAIL))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    yield path, fd, body
    os.close(fd)
    shutil.rmtree(d)


def _gone(path, timeout=5.0):
    """Whether the loop device at ``path`` gets detached within ``timeout``, as losetup sees it."""
    deadline = time.monotonic() + timeout
    while path in attached_loops():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_attach_exposes_exactly_the_partition_read_only(backing):
    path, fd, body = backing
    dev = loop.attach(fd, HEAD, BODY, str(path))
    try:
        st = loop.status(dev.path)
        assert (st.offset, st.sizelimit) == (HEAD, BODY)
        assert (st.backing_dev, st.backing_ino) == (os.stat(path).st_dev, os.stat(path).st_ino)
        assert st.flags & (loop.LO_FLAGS_READ_ONLY | loop.LO_FLAGS_AUTOCLEAR) == \
            loop.LO_FLAGS_READ_ONLY | loop.LO_FLAGS_AUTOCLEAR
        # The same, as the system tells it (not only as loop.status reads it).
        listed = subprocess.run(["losetup", "--json", "--list", "--output",
                                 "NAME,OFFSET,SIZELIMIT,RO,AUTOCLEAR,BACK-INO", dev.path],
                                capture_output=True, text=True, check=True).stdout
        (row,) = json.loads(listed)["loopdevices"]
        assert (int(row["offset"]), int(row["sizelimit"]), row["ro"], row["autoclear"], int(row["back-ino"])) == \
            (HEAD, BODY, True, True, os.stat(path).st_ino), row
        with open(dev.path, "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest()
        with pytest.raises(OSError) as err:  # read-only: even root cannot write through it
            wfd = os.open(dev.path, os.O_WRONLY)
            try:
                os.write(wfd, b"x" * 512)
            finally:
                os.close(wfd)
        assert err.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
        assert path.read_bytes()[HEAD:HEAD + BODY] == body
    finally:
        dev.close()
    assert _gone(dev.path), "autoclear should detach the device once our fd is closed"
    assert str(dev.path) not in loops_backed_by(path)


def test_the_loop_device_is_read_only_even_over_a_writable_descriptor(backing):
    """Read-only is the loop device's own flag, not only what a read-only descriptor implies: over a
    descriptor opened for writing, the device is still read-only and refuses root's write."""
    path, _, body = backing
    writable = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        dev = loop.attach(writable, HEAD, BODY, str(path))
    finally:
        os.close(writable)
    try:
        ro = subprocess.run(["blockdev", "--getro", dev.path], capture_output=True, text=True, check=True)
        assert ro.stdout.strip() == "1"
        with pytest.raises(OSError) as err:
            wfd = os.open(dev.path, os.O_WRONLY)
            try:
                os.write(wfd, b"x" * 512)
                os.fsync(wfd)
            finally:
                os.close(wfd)
        assert err.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
        assert path.read_bytes()[HEAD:HEAD + BODY] == body
    finally:
        dev.close()


def test_parallel_attaches_get_distinct_devices(backing):
    path, fd, _ = backing
    devices = [loop.attach(fd, HEAD, BODY) for _ in range(4)]
    try:
        assert len({d.path for d in devices}) == 4
    finally:
        for d in devices:
            d.close()
    assert all(_gone(d.path) for d in devices)


def test_detach_if_ours_checks_identity(backing):
    path, fd, _ = backing
    dev = loop.attach(fd, HEAD, BODY)
    st = os.stat(path)
    try:
        assert loop.detach_if_ours(dev.path, st.st_dev, st.st_ino, HEAD + 512) is False  # other offset
        assert loop.detach_if_ours(dev.path, st.st_dev, st.st_ino + 1, HEAD) is False   # other file
        assert dev.path in attached_loops()
        # Ours, but still held by our fd: the kernel only (re)arms autoclear; closing detaches.
        assert loop.detach_if_ours(dev.path, st.st_dev, st.st_ino, HEAD) is True
    finally:
        dev.close()
    assert _gone(dev.path)
    assert loop.detach_if_ours(dev.path, st.st_dev, st.st_ino, HEAD) is False  # idempotent



def test_a_loop_device_over_zero_bytes_is_never_asked_for(backing):
    """To the kernel a size limit of 0 means "to the end of the file": a partition of 0 bytes would
    expose everything after its offset. attach refuses it before any loop device exists."""
    path, fd, _ = backing
    try:
        dev = loop.attach(fd, HEAD, 0, str(path))
    except ValueError as err:
        assert str(err) == "loop device over 0 bytes"
    else:
        with open(dev.path, "rb") as f:
            exposed = len(f.read())
        dev.close()
        pytest.fail(f"attached {dev.path} over {exposed} bytes: everything after the offset")
    assert loops_backed_by(path) == []
