"""One unlock per job per node, the parts that need no kernel: the key fingerprint, the per-job lock
(real flocks between processes), and the hold records a step lets go of. Mappings being shared
for real is tested in the VM (test_vm_reuse.py, test_vm_reuse_slurm.py)."""
import os
import time

from spank_sif import lifecycle
from spank_sif.config import SiteConfig
from spank_sif.secret import Secret
from spank_sif.state import StateDir

SESSION = "spank-sif-42.batch-0a1b2c3d"


def test_the_fingerprint_is_salted_and_tells_keys_apart():
    salt, other_salt = os.urandom(16), os.urandom(16)
    key = Secret(b"the passphrase")
    fingerprint = lifecycle.key_fingerprint(salt, key)
    assert fingerprint == lifecycle.key_fingerprint(salt, Secret(b"the passphrase"))
    assert fingerprint != lifecycle.key_fingerprint(other_salt, key)
    assert fingerprint != lifecycle.key_fingerprint(salt, Secret(b"the passphrase "))
    assert b"the passphrase".hex() not in fingerprint and len(fingerprint) == 64
    reuse = {"salt": salt.hex(), "fingerprint": fingerprint}
    assert lifecycle._same_key(reuse, key)
    assert not lifecycle._same_key(reuse, Secret(b"another"))
    assert not lifecycle._same_key({"salt": "zz", "fingerprint": fingerprint}, key)  # damaged record
    assert not lifecycle._same_key({"fingerprint": fingerprint}, key)


def test_the_job_lock_is_held_across_processes_and_waited_for_with_a_deadline(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        with state.job_lock("42.0", "reuse-0123", 5) as locked:
            os.write(ready_w, b"1" if locked else b"0")
            os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        start = time.monotonic()
        with state.job_lock("42.1", "reuse-0123", 0.3) as locked:
            assert not locked
        assert 0.3 <= time.monotonic() - start < 5
        with state.job_lock("42.1", "reuse-4567", 0.3) as locked:
            assert locked  # another image of the job: another lock
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
    with state.job_lock("42.1", "reuse-0123", 0.3) as locked:
        assert locked  # the holder ended


def test_lock_files_stay_while_the_job_has_records(tmp_path):
    state = StateDir(str(tmp_path / "state"))
    with state.job_lock("42.0", "reuse-0123", 1):
        state.record("session", "42.0", SESSION, {"status": "unlocked"})
    assert not state.drop_job_dir("42")
    assert (tmp_path / "state" / "42" / ".reuse-0123.lock").exists()
    state.remove("session", "42.0", SESSION)
    assert state.drop_job_dir("42") and not (tmp_path / "state" / "42").exists()


def _shared(state: StateDir) -> None:
    state.record("session", "42.batch", SESSION, {"status": "unlocked", "pid": 1})
    for step, pid in (("42.batch", 100), ("42.0", 200), ("42.1", 300)):
        state.record("hold", step, SESSION, {"step": step, "pid": pid}, f"{step}+{pid}")
        state.record("mount", step, SESSION, {"target": "/sif", "ns": "mnt:[1]", "pid": pid + 1,
                                              "holder": f"{step}+{pid}"}, str(pid + 1))


def test_a_step_lets_go_of_its_own_hold_and_mounts_only(tmp_path):
    config = SiteConfig(state_dir=str(tmp_path / "state"))
    state = StateDir(config.state_dir)
    _shared(state)
    step = lifecycle.Unlocked(SESSION, "42.batch", "/img.sif", "/dev/mapper/" + SESSION, True, config)
    step.holder = "42.0+200"
    done = lifecycle.release(step, config)
    assert sorted(done) == ["hold of step 42.0", "mount /sif"]
    left = sorted((r.kind, r.key) for r in state.records("42"))
    assert left == [("hold", "42.1+300"), ("hold", "42.batch+100"), ("mount", "101"), ("mount", "301"),
                    ("session", "")]
    assert [e["steps"] for e in lifecycle.list_active(config)] == [["42.batch", "42.1"]]


def test_the_epilog_removes_the_holds_of_steps_that_died(tmp_path):
    config = SiteConfig(state_dir=str(tmp_path / "state"))
    state = StateDir(config.state_dir)
    _shared(state)
    with state.job_lock("42.0", "reuse-0123", 1):
        pass
    done = lifecycle.sweep_job("42", config)
    assert sum(d.startswith("hold") for d in done) == 3
    assert state.records() == [] and not (tmp_path / "state" / "42").exists()
