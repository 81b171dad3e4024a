"""Encrypted images through a real Slurm, under a kernel with dm-crypt (the VM harness).

Single-node Slurm started inside the VM (tests/slurm), reference images built the way Apptainer
builds them (``ref_images``: cheap-KDF twins, PEM and passphrase mode), jobs run as ``sifuser``.
After every job: no mapping, loop device, mount or state record left.
"""
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine_helpers import mappings
from slurm.fixtures import (assert_one_error, assert_saw_nothing, cluster, kill_step,  # noqa: F401
                            leftovers, looks_for_the_mount, mount_point, sif_lines, site_yaml,
                            slurm_cluster, wait_no_leftovers)

pytestmark = [pytest.mark.vm, pytest.mark.slurm, pytest.mark.root]

CAT = 'cat "$SIF_IMAGE_ROOT/hello.txt"'


def _give(src: Path, dest: Path, user=None, mode=0o644) -> Path:
    shutil.copyfile(src, dest)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(dest, entry.pw_uid, entry.pw_gid)
    os.chmod(dest, mode)
    return dest


@pytest.fixture(scope="module")
def enc(ref_images, slurm_cluster):
    """Encrypted images every user can read, and the keys as sifuser holds them."""
    d = slurm_cluster.root / "encrypted"
    d.mkdir(mode=0o755, exist_ok=True)
    home = Path(pwd.getpwnam("sifuser").pw_dir)
    return {
        "hello": ref_images.hello.decode(),
        "pass": _give(ref_images.fast_pass_4k, d / "pass.sif"),
        "pem": _give(ref_images.fast_pem_4k, d / "pem.sif"),
        "slow_kdf": _give(ref_images.enc_pass, d / "slow-kdf.sif"),  # cryptsetup's default Argon2id
        "passphrase": ref_images.pass_file.read_text(),
        "pem_file": _give(ref_images.pem_private, home / "key.pem", "sifuser", 0o600),
        "root_pem": _give(ref_images.pem_private, d / "root-key.pem", None, 0o600),
    }


def key_env(enc, mode):
    if mode == "pass":
        return {"APPTAINER_ENCRYPTION_PASSPHRASE": enc["passphrase"]}
    return {"APPTAINER_ENCRYPTION_PEM_PATH": str(enc["pem_file"])}


@pytest.mark.parametrize("mode", ["pass", "pem"])
def test_srun_encrypted_image(cluster, enc, mode):
    out = cluster.run(["srun", f"--sif-image={enc[mode]}", "sh", "-c", f"{CAT}; env"],
                      env=key_env(enc, mode))
    assert out.returncode == 0, out.stderr
    assert enc["hello"] in out.stdout
    assert "_ENCRYPTION_" not in out.stdout      # stripped from the tasks' environment
    assert sif_lines(out.stderr) == []
    assert wait_no_leftovers(cluster) == []


def test_four_tasks_cost_one_unlock_and_other_users_see_nothing(cluster, enc):
    job = subprocess.Popen(
        ["srun", "-n", "4", "--overcommit", f"--sif-image={enc['pass']}", "sh", "-c",
         f"{CAT}; sleep 30"],
        env=cluster.env("sifuser", **key_env(enc, "pass")), user="sifuser",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(4):
            assert job.stdout.readline() == enc["hello"]
        assert len(mappings()) == 1, mappings()
        other = cluster.run(["srun", "--overcommit", "sh", "-c", looks_for_the_mount(cluster)],
                            user="sifother")
        assert_saw_nothing(other, "sifother")
        assert job.poll() is None, "the image's job ended before the other user looked"
        with open("/proc/self/mountinfo") as f:
            assert f" {mount_point(cluster)} " not in f.read()
    finally:
        job.send_signal(signal.SIGINT)
        job.communicate(timeout=120)
    assert wait_no_leftovers(cluster) == []


KEY_ERRORS = [
    # image, key environment (callable of enc), site config, words in the one line
    ("pass", lambda e: {"APPTAINER_ENCRYPTION_PASSPHRASE": "not the passphrase"}, "",
     ["no keyslot"]),
    ("pem", lambda e: {"APPTAINER_ENCRYPTION_PASSPHRASE": e["passphrase"]}, "", ["no keyslot"]),
    ("pass", lambda e: {}, "", ["no key"]),
    ("pem", lambda e: {"APPTAINER_ENCRYPTION_PEM_PATH": str(e["root_pem"])}, "",
     ["cannot read"]),
    ("slow_kdf", lambda e: {"APPTAINER_ENCRYPTION_PASSPHRASE": e["passphrase"]},
     "kdf_max_memory_kib: 1024\n", ["kdf_max_memory_kib"]),
]


@pytest.mark.parametrize("image,env,config,words", KEY_ERRORS, ids=[
    "wrong-passphrase", "passphrase-for-pem-image", "no-key", "pem-unreadable", "kdf-above-cap"])
def test_key_errors(cluster, enc, image, env, config, words):
    cluster.write_site_config(site_yaml(cluster, config))
    out = cluster.run(["srun", f"--sif-image={enc[image]}", "echo", "task ran"], env=env(enc))
    assert_one_error(out, *words)
    assert "task ran" not in out.stdout
    assert enc["passphrase"] not in out.stderr + cluster.log("slurmd")
    assert wait_no_leftovers(cluster) == []


def test_sbatch_with_nested_sruns_and_salloc(cluster, enc):
    script = f"""#!/bin/sh
#SBATCH --sif-image={enc['pem']}
{CAT}
srun sh -c '{CAT}; env | grep -c _ENCRYPTION_ || true'
"""
    out_file = Path("/home/sifuser/enc-batch.out")
    res = cluster.run(["sbatch", "--wait", "-o", str(out_file)], input=script,
                      env=key_env(enc, "pem"))
    text = out_file.read_text()
    out_file.unlink()
    assert res.returncode == 0, res.stderr + text
    assert text.count(enc["hello"]) == 2, text
    assert text.splitlines()[-1] == "0", text      # the nested step's tasks hold no key variable
    alloc = cluster.run(["salloc", f"--sif-image={enc['pass']}", "srun", "sh", "-c", CAT],
                        env=key_env(enc, "pass"))
    assert alloc.returncode == 0 and enc["hello"] in alloc.stdout, alloc.stderr
    assert wait_no_leftovers(cluster) == []


def test_killed_slurmstepd_mapping_is_swept_by_the_epilog(cluster, enc):
    job = subprocess.Popen(
        ["srun", f"--sif-image={enc['pass']}", "sh", "-c", f"{CAT}; sleep 120"],
        env=cluster.env("sifuser", **key_env(enc, "pass")), user="sifuser",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline() == enc["hello"]
        assert len(mappings()) == 1, mappings()
        kill_step(cluster)
    finally:
        try:
            job.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            job.kill()
            job.communicate()
    subprocess.run(["scancel", "-u", "sifuser"], env=cluster.env(), capture_output=True)
    time.sleep(1)
    assert wait_no_leftovers(cluster, timeout=120) == [], leftovers(cluster)
