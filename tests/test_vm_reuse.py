"""One unlock per job per node, on a kernel with dm-crypt (the VM harness), in the node engine.

Later steps of a job join the mapping an earlier step made for the same user, image file and key;
anything else unlocks afresh, and a step with a wrong or no key is refused as ever. What is shared
is counted from outside the engine: the device-mapper devices ``dmsetup`` lists, whose names carry
the label of the step that made them. The real-Slurm side (batch jobs of several steps) is in
test_vm_reuse_slurm.py."""
import os
import shutil
import time
from pathlib import Path

import pytest

from engine_helpers import site  # noqa: F401 - a pytest fixture
from engine_helpers import OTHER, USER, ensure_users, in_child, in_children, leftovers, mappings, world_dir
from spank_sif import lifecycle
from spank_sif.errors import KeyMaterialError, WrongKeyError
from spank_sif.userfiles import User

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def ref(ref_images):
    ensure_users()
    d = world_dir("sif-vm-reuse-")
    for source in (ref_images.pass_file, ref_images.pem_private, ref_images.fast_pass_4k,
                   ref_images.fast_pem_4k, ref_images.enc_pass):
        shutil.copy(source, d / source.name)
        (d / source.name).chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _pass(ref: Path) -> dict:
    return {"APPTAINER_ENCRYPTION_PASSPHRASE": (ref / "pass.txt").read_text()}


def _pem(ref: Path) -> dict:
    return {"APPTAINER_ENCRYPTION_PEM_PATH": str(ref / "rsa2048.pem")}


def _unlock(image: Path, env: dict, step: str, config, user=USER):
    return lifecycle.unlock(str(image), User.from_name(user), env, step, config)


def _records(state: Path) -> list[str]:
    return sorted(p.name.split("~", 1)[1] for p in state.rglob("*.json"))


@pytest.mark.parametrize("mode", ["pass", "pem"])
def test_later_steps_join_the_first_steps_mapping_until_the_epilog(ref, site, mode):
    config, state = site
    image = ref / f"fast-{mode}-4096.sif"
    env = _pass(ref) if mode == "pass" else _pem(ref)
    first = _unlock(image, env, "5100.0", config)
    made = mappings()
    assert made == [first.session] and first.session.startswith("spank-sif-5100.0-")
    lifecycle.release(first, config)
    assert mappings() == made  # the step is gone, the mapping stays for the job
    later = [_unlock(image, env, f"5100.{i}", config) for i in (1, 2, 3)]
    assert {u.session for u in later} == {first.session}
    assert mappings() == made  # nothing new was mapped
    assert sum(r.startswith("hold~") for r in _records(state)) == 3
    for u in later:
        lifecycle.release(u, config)
    assert mappings() == made
    assert not any(r.startswith("hold~") for r in _records(state))
    assert lifecycle.sweep_job("5100", config)
    assert leftovers(image, state) == []


def test_a_wrong_or_missing_key_is_refused_although_the_job_has_the_mapping(ref, site):
    config, state = site
    image = ref / "fast-pass-4096.sif"
    first = _unlock(image, _pass(ref), "5200.0", config)
    before = _records(state)
    with pytest.raises(WrongKeyError, match="no keyslot of the image accepts this key"):
        _unlock(image, {"APPTAINER_ENCRYPTION_PASSPHRASE": "not the passphrase"}, "5200.1", config)
    with pytest.raises(KeyMaterialError, match="no key was given"):
        _unlock(image, {}, "5200.2", config)
    with pytest.raises(WrongKeyError):
        _unlock(image, _pem(ref), "5200.3", config)  # a PEM key for a passphrase image
    assert mappings() == [first.session]
    assert _records(state) == before  # the refused steps left nothing, and hold nothing
    lifecycle.sweep_job("5200", config)
    assert leftovers(image, state) == []


def test_other_jobs_other_users_and_changed_files_unlock_afresh(ref, site, tmp_path):
    config, state = site
    d = world_dir("sif-vm-reuse-own-")
    try:
        image = d / "img.sif"
        shutil.copy(ref / "fast-pass-4096.sif", image)
        image.chmod(0o644)
        first = _unlock(image, _pass(ref), "5300.0", config)
        other_job = _unlock(image, _pass(ref), "5301.0", config)
        other_user = _unlock(image, _pass(ref), "5300.1", config, user=OTHER)
        time.sleep(0.01)
        os.utime(image)  # same inode, new modification time
        touched = _unlock(image, _pass(ref), "5300.2", config)
        replacement = d / "new.sif"
        shutil.copy(ref / "fast-pass-4096.sif", replacement)
        replacement.chmod(0o644)
        os.rename(replacement, image)  # a new inode under the same name
        replaced = _unlock(image, _pass(ref), "5300.3", config)
        again = _unlock(image, _pass(ref), "5300.4", config)
        names = [u.session for u in (first, other_job, other_user, touched, replaced)]
        assert len(set(names)) == 5, names
        assert again.session == replaced.session
        assert mappings() == sorted(names)
        lifecycle.sweep_job("5300", config)
        lifecycle.sweep_job("5301", config)
        assert mappings() == []
        assert leftovers(image, state) == []
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_reuse_off_restores_one_unlock_per_step(ref, site):
    config, state = site
    config = config._replace(reuse_mappings=False)
    image = ref / "fast-pass-4096.sif"
    first = _unlock(image, _pass(ref), "5400.0", config)
    second = _unlock(image, _pass(ref), "5400.1", config)
    assert first.session != second.session and len(mappings()) == 2
    lifecycle.release(first, config)
    lifecycle.release(second, config)
    assert leftovers(image, state) == []  # each step's release removed its own


def _session_of(image, env, step, config) -> str:
    return _unlock(image, env, step, config).session  # the child exits holding it, as a step would


def test_racing_steps_derive_once_and_both_run(ref, site):
    """Two steps start at once on an image with cryptsetup's default KDF (seconds to derive): the
    second waits for the first and joins its mapping."""
    config, state = site
    image = ref / "enc-pass.sif"
    results = in_children([(_session_of, image, _pass(ref), f"5500.{i}", config) for i in (0, 1)])
    assert [status for status, _ in results] == [0, 0], results
    names = {name for _, name in results}
    assert len(names) == 1 and mappings() == sorted(names), (results, mappings())
    holds = [r for r in _records(state) if r.startswith("hold~")]
    assert len(holds) == 2, _records(state)
    lifecycle.sweep_job("5500", config)
    assert leftovers(image, state) == []


def test_a_step_killed_holding_the_mapping_leaves_it_to_the_others_and_the_epilog(ref, site, tmp_path):
    config, state = site
    image = ref / "fast-pass-4096.sif"
    first = _unlock(image, _pass(ref), "5600.0", config)
    status, _ = in_child(_session_of, image, _pass(ref), "5600.1", config, env={"SPANK_SIF_KILL_AT": "joined"})
    assert status == -9
    assert sum(r.startswith("hold~5600.1+") for r in _records(state)) == 1  # the dead step's hold stays
    target = tmp_path / "mnt"
    target.mkdir()
    later = _unlock(image, _pass(ref), "5600.2", config)
    assert later.session == first.session and mappings() == [first.session]
    lifecycle.mount(later, str(target), private=False)
    assert (target / "hello.txt").exists()
    done = lifecycle.sweep_job("5600", config)
    assert any(d.startswith("hold") for d in done) and f"mapping {first.session}" in done
    assert leftovers(image, state, target) == []
