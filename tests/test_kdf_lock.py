"""The node's KDF lock (dmcrypt.KdfSemaphore): slots shared across processes, and a deadline on
waiting for one that ends in one line naming the cause. (The engine under it: tests/test_vm_kdf.py.)"""
import fcntl
import os
import threading
import time

import pytest

from engine_helpers import measured
from spank_sif import dmcrypt


def hold_slots(directory, slots):
    """Take every slot the way another step would (its own open file description)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fds = []
    for index in range(slots):
        fd = os.open(os.path.join(directory, f"kdf.{index}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fds.append(fd)
    return fds


def _wait_for_a_slot(directory, slots, timeout):
    with dmcrypt.KdfSemaphore(str(directory), slots, timeout).held():
        return "a slot was free"


@pytest.mark.parametrize("slots", [1, 3])
def test_waiting_for_a_busy_node_ends_in_one_line(tmp_path, slots):
    """In a child, so that waiting without a deadline fails the test instead of hanging it."""
    held = hold_slots(tmp_path, slots)
    try:
        status, result, waited, _ = measured(_wait_for_a_slot, tmp_path, slots, 1, timeout=30)
    finally:
        for fd in held:
            os.close(fd)
    assert status == 1 and 1 <= waited < 5, (status, result, waited)
    assert "\n" not in result
    assert result.startswith(f"SystemSetupError: gave up after 1 s waiting for this node's key-derivation slot "
                             f"(kdf_max_parallel: {slots}), which other steps' unlocks held all that time")
    assert "kdf_lock_timeout" in result


def test_a_slot_freed_before_the_deadline_is_taken(tmp_path):
    held = hold_slots(tmp_path, 1)
    threading.Timer(0.5, os.close, [held[0]]).start()
    start = time.monotonic()
    with dmcrypt.KdfSemaphore(str(tmp_path), 1, timeout=30).held():
        waited = time.monotonic() - start
    assert 0.4 < waited < 5
    pid, begin, end = (tmp_path / "kdf.log").read_text().split()
    assert int(pid) == os.getpid() and float(begin) <= float(end)


def test_a_free_slot_among_busy_ones_is_taken_at_once(tmp_path):
    held = hold_slots(tmp_path, 2)  # slots 0 and 1 busy, slot 2 free
    try:
        start = time.monotonic()
        with dmcrypt.KdfSemaphore(str(tmp_path), 3, timeout=30).held():
            assert time.monotonic() - start < 1
    finally:
        for fd in held:
            os.close(fd)
