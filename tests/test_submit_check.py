"""The submit check (spank_sif/submit.py): srun, sbatch and salloc refuse, before a job ID exists,
an image or a key the nodes would refuse, with the node's one line.

Two layers: ``submit.check`` itself on real images, keys and libcryptsetup (no Slurm); then the
plugin under the real Slurm, where "before a job ID exists" is measured from outside: a held
canary job submitted just before and just after the failing command gets consecutive job IDs.
The key check is userspace libcryptsetup, so encrypted images are checked on the host too (their
node side, dm-crypt, is the VM's).
"""
import os
import sys
from pathlib import Path

import pytest

import reftools
from slurm.fixtures import (HELLO, assert_one_error, cluster, plain_images, sif_lines,  # noqa: F401
                            site_yaml, slurm_cluster, write_image)
from spank_sif import sif, submit
from spank_sif.config import SiteConfig, parse_config
from spank_sif.errors import ConfigError, ImageError, KeyMaterialError, PolicyError, UnsupportedImageError, WrongKeyError

KEY = b"secret-pass"
RIGHT = {"APPTAINER_ENCRYPTION_PASSPHRASE": KEY.decode()}
WRONG = {"APPTAINER_ENCRYPTION_PASSPHRASE": "not-the-key"}
# Argon2 memory of the deliberately expensive image: a derivation shows in the memory high-water.
EXPENSIVE_KIB = 262144
EXPENSIVE_KDF = ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory",
                 str(EXPENSIVE_KIB), "--pbkdf-parallel", "1"]


def _encrypted_image(d: Path, name: str, *kdf: str) -> Path:
    tree = d / f"{name}-tree"
    squashfs = reftools.make_squashfs(tree, d / f"{name}.sqfs", {"hello.txt": HELLO})
    payload = reftools.luks_encrypt_payload(squashfs, d / f"{name}.luks", KEY, *kdf, fast=not kdf)
    return write_image(d / f"{name}.sif", payload.read_bytes(), sif.FsType.ENCRYPTED_SQUASHFS)


# ------------------------------------------------------------------ submit.check, no Slurm

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("submit")
    squashfs = reftools.make_squashfs(d / "tree", d / "rootfs.sqfs", {"hello.txt": HELLO}).read_bytes()
    not_sif = d / "not-a-sif.sif"
    not_sif.write_bytes(b"#!/bin/sh\necho not a SIF\n" * 10)
    return {"plain": write_image(d / "plain.sif", squashfs),
            "writable": write_image(d / "writable.sif", squashfs, mode=0o666),
            "gocryptfs": write_image(d / "gocryptfs.sif", squashfs, sif.FsType.GOCRYPTFS_SQUASHFS),
            "encrypted": _encrypted_image(d, "encrypted"),
            "not_sif": not_sif, "dir": d}


# The plain images belong to whoever runs the tests: "always" lets the kernel_mount rule pass them.
ANY_OWNER = SiteConfig(kernel_mount="always")


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_good_images_pass(images, mode):
    assert submit.check(str(images["plain"]), {}, ANY_OWNER, mode) is None
    assert submit.check(str(images["encrypted"]), RIGHT, ANY_OWNER, mode) is None


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("name, env, error, words", [
    ("missing.sif", RIGHT, ImageError, ["missing.sif does not exist"]),
    ("not_sif", RIGHT, ImageError, ["not a SIF"]),
    ("gocryptfs", RIGHT, UnsupportedImageError, ["gocryptfs"]),
    ("encrypted", {}, KeyMaterialError, ["no key was given", "APPTAINER_ENCRYPTION_PASSPHRASE"]),
    ("encrypted", {"APPTAINER_ENCRYPTION_PASSPHRASE": ""}, KeyMaterialError, ["empty"]),
])
def test_what_the_node_refuses_is_refused_in_its_words(images, mode, name, env, error, words):
    path = images.get(name, images["dir"] / name)
    with pytest.raises(error) as exc:
        submit.check(str(path), env, ANY_OWNER, mode)
    assert type(exc.value) is error
    for word in words:
        assert word in str(exc.value)


def test_a_wrong_key_is_refused_only_by_the_full_check(images):
    with pytest.raises(WrongKeyError, match="no keyslot"):
        submit.check(str(images["encrypted"]), WRONG, ANY_OWNER, "full")
    assert submit.check(str(images["encrypted"]), WRONG, ANY_OWNER, "fast") is None  # no derivation
    assert submit.check(str(images["encrypted"]), WRONG, ANY_OWNER, "off") is None


@pytest.mark.parametrize("config", ["kernel_mount: always\nallow_unencrypted: false",
                                    "kernel_mount: always\nallowed_image_paths: [/nowhere]",
                                    "kernel_mount: encrypted-only"])
def test_the_site_rules_apply(images, config):
    with pytest.raises(PolicyError):  # (the writable copy: plain, and everyone may change it)
        submit.check(str(images["writable"]), {}, parse_config(config), "full")


def test_the_kdf_caps_apply_before_the_key_is_looked_at(images):
    site = SiteConfig(kernel_mount="always", kdf_max_memory_kib=1024)
    with pytest.raises(PolicyError, match="kdf_max_memory_kib"):
        submit.check(str(images["encrypted"]), {}, site, "fast")


def test_an_image_whose_directory_is_not_here_is_not_checked(images):
    note = submit.check("/nonexistent-dir/app.sif", {}, ANY_OWNER, "full")
    assert "/nonexistent-dir does not exist on this host" in note
    assert "not checked at submit" in note


@pytest.mark.parametrize("site, context, env, expected", [
    ("full", "local", {}, "full"),
    ("full", "local", {"SLURM_JOB_ID": "7"}, "fast"),      # srun inside a job
    ("full", "allocator", {"SLURM_JOB_ID": "7"}, "full"),  # sbatch/salloc from a job: a new job
    ("fast", "local", {}, "fast"),
    ("off", "local", {"SLURM_JOB_ID": "7"}, "off"),
])
def test_mode(site, context, env, expected):
    assert submit.mode_for(site, context, env) == expected


def test_submit_check_is_validated():
    assert SiteConfig().submit_check == "full"
    assert parse_config("submit_check: fast").submit_check == "fast"
    assert parse_config("submit_check: off").submit_check == "off"  # YAML's false, unquoted
    assert parse_config("submit_check: 'off'").submit_check == "off"
    with pytest.raises(ConfigError, match="'submit_check' must be one of full, fast, off"):
        parse_config("submit_check: sometimes")
    with pytest.raises(ConfigError, match="'submit_check' must be a string"):
        parse_config("submit_check: yes")


# ------------------------------------------------------------------ under the real Slurm

def _canary(cluster) -> int:
    out = cluster.run(["sbatch", "--hold", "--parsable", "-o", "/dev/null", "--wrap", "true"], check=True)
    job = int(out.stdout.strip().split(";")[0])
    cluster.run(["scancel", str(job)])
    return job


def _submit(cluster, command, image, env, extra=()):
    argv = {"sbatch": ["sbatch", "-o", "/dev/null", f"--sif-image={image}", *extra, "--wrap", "true"],
            "srun": ["srun", f"--sif-image={image}", *extra, "true"],
            "salloc": ["salloc", f"--sif-image={image}", *extra, "true"]}[command]
    return cluster.run(argv, env=env)


def assert_no_job_between(cluster, run):
    """``run()``'s command created no job: canaries before and after it have consecutive IDs."""
    before = _canary(cluster)
    result = run()
    after = _canary(cluster)
    assert after == before + 1, f"a job was created between {before} and {after}:\n{result.stderr}"
    assert "Submitted batch job" not in result.stdout + result.stderr
    assert "Granted job allocation" not in result.stderr
    return result


CASES = [
    # image key (or a name in the images directory), environment, words of the one line
    ("encrypted", WRONG, ["no keyslot"]),
    ("encrypted", {}, ["no key was given"]),
    ("missing.sif", RIGHT, ["missing.sif does not exist"]),
    ("not_sif", RIGHT, ["not a SIF"]),
    ("root_only", RIGHT, ["cannot read"]),  # opened as the user: root's file stays unreadable
]


@pytest.mark.slurm
@pytest.mark.root
@pytest.mark.parametrize("command", ["sbatch", "srun", "salloc"])
@pytest.mark.parametrize("image, env, words", CASES, ids=["wrong-key", "no-key", "missing", "not-sif",
                                                           "unreadable"])
def test_refused_before_a_job_id_exists(cluster, plain_images, command, image, env, words):
    cluster.write_site_config(site_yaml(cluster, submit_check="full"))
    path = plain_images.get(image, plain_images["plain"].parent / image)
    result = assert_no_job_between(cluster, lambda: _submit(cluster, command, path, env))
    assert_one_error(result, *words)
    assert "not-the-key" not in result.stderr + result.stdout


@pytest.mark.slurm
@pytest.mark.root
def test_the_right_key_queues_and_runs(cluster, plain_images):
    cluster.write_site_config(site_yaml(cluster, submit_check="full"))
    out = cluster.run(["srun", f"--sif-image={plain_images['plain']}", "cat", "/dev/null"])
    assert out.returncode == 0 and sif_lines(out.stderr) == [], out.stderr
    out_file = "/home/sifuser/submit-check.out"
    res = cluster.run(["sbatch", "--wait", "-o", out_file, f"--sif-image={plain_images['plain']}",
                       "--wrap", 'cat "$SIF_IMAGE_ROOT/hello.txt"'])
    text = Path(out_file).read_text()
    os.unlink(out_file)
    assert res.returncode == 0 and HELLO.decode() in text, res.stderr + text
    alloc = cluster.run(["salloc", f"--sif-image={plain_images['plain']}", "srun", "sh", "-c",
                         'cat "$SIF_IMAGE_ROOT/hello.txt"'])
    assert alloc.returncode == 0 and HELLO.decode() in alloc.stdout, alloc.stderr
    # An encrypted image with its key passes the check and is queued: the job ID exists, and the
    # node (no dm-crypt on this host) is where it stops.
    enc = cluster.run(["sbatch", "-o", "/dev/null", f"--sif-image={plain_images['encrypted']}",
                       "--wrap", "true"], env=RIGHT)
    assert enc.returncode == 0 and "Submitted batch job" in enc.stdout, enc.stderr
    assert sif_lines(enc.stderr) == []
    node = cluster.run(["srun", f"--sif-image={plain_images['encrypted']}", "true"], env=RIGHT)
    assert_one_error(node, "dm-crypt")


@pytest.mark.slurm
@pytest.mark.root
@pytest.mark.parametrize("command", ["sbatch", "srun"])
def test_off_queues_as_before_and_the_node_refuses(cluster, plain_images, command):
    cluster.write_site_config(site_yaml(cluster, submit_check="off"))
    missing = plain_images["plain"].parent / "missing.sif"
    before = _canary(cluster)
    result = _submit(cluster, command, missing, {})
    assert _canary(cluster) > before + 1, "no job was created"
    if command == "sbatch":
        assert result.returncode == 0 and "Submitted batch job" in result.stdout, result.stderr
        assert sif_lines(result.stderr) == []
    else:  # the step is refused on the node, in the same words
        assert_one_error(result, "missing.sif does not exist")


@pytest.mark.slurm
@pytest.mark.root
def test_an_image_not_visible_here_is_not_checked_and_queues(cluster):
    cluster.write_site_config(site_yaml(cluster, submit_check="full"))
    result = cluster.run(["sbatch", "-o", "/dev/null", "--sif-image=/nonexistent-dir/app.sif",
                          "--wrap", "true"])
    assert result.returncode == 0 and "Submitted batch job" in result.stdout, result.stderr
    (line,) = sif_lines(result.stderr)
    assert "/nonexistent-dir does not exist on this host" in line and "not checked at submit" in line


# ------------------------------------------------------------------ fast: no key derivation

MAXRSS = """\
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(result.stdout)
sys.stderr.write(result.stderr)
print(f"maxrss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(result.returncode)
"""


def _peak_kib(result) -> int:
    return int(next(line.split("=")[1] for line in result.stderr.splitlines() if line.startswith("maxrss_kib=")))


@pytest.fixture(scope="module")
def expensive_image(slurm_cluster, plain_images):
    """An encrypted image whose key derivation needs EXPENSIVE_KIB of memory."""
    return _encrypted_image(plain_images["plain"].parent, "expensive", *EXPENSIVE_KDF)


@pytest.mark.slurm
@pytest.mark.root
def test_fast_does_not_derive_the_key(cluster, expensive_image):
    """Measured from outside: the memory high-water of sbatch itself. The full check runs the
    Argon2 derivation (its memory cost shows); fast reads the same header and key but derives
    nothing (so a wrong key passes it, and the node refuses it later)."""
    peaks = {}
    for mode in ("full", "fast"):
        cluster.write_site_config(site_yaml(cluster, submit_check=mode))
        result = cluster.run([sys.executable, "-c", MAXRSS, "sbatch", "--hold", "-o", "/dev/null",
                              f"--sif-image={expensive_image}", "--wrap", "true"], env=RIGHT)
        assert result.returncode == 0 and "Submitted batch job" in result.stdout, result.stderr
        peaks[mode] = _peak_kib(result)
    cluster.run(["scancel", "-u", "sifuser"])
    assert peaks["full"] > EXPENSIVE_KIB, peaks
    assert peaks["fast"] < EXPENSIVE_KIB / 2, peaks
    cluster.write_site_config(site_yaml(cluster, submit_check="fast"))
    wrong = cluster.run(["sbatch", "--hold", "-o", "/dev/null", f"--sif-image={expensive_image}",
                         "--wrap", "true"], env=WRONG)
    assert "Submitted batch job" in wrong.stdout, wrong.stderr


@pytest.mark.slurm
@pytest.mark.root
def test_srun_inside_a_job_is_checked_fast(cluster, expensive_image, tmp_path):
    """Inside an allocation a step's srun checks everything but the key derivation: with a wrong
    key it reaches the node (which, on this host without dm-crypt, stops it there), while the same
    srun outside a job is refused at submit; without a key it is refused before the step."""
    cluster.write_site_config(site_yaml(cluster, submit_check="full"))
    outside = cluster.run(["srun", f"--sif-image={expensive_image}", "true"], env=WRONG)
    assert_one_error(outside, "no keyslot")
    script = (f"#!/bin/sh\n"
              f"srun --sif-image={expensive_image} true 2>&1 | sed 's/^/wrong: /'\n"
              f"env -u APPTAINER_ENCRYPTION_PASSPHRASE srun --sif-image={expensive_image} true 2>&1 "
              f"| sed 's/^/none: /'\n")
    out_file = "/home/sifuser/inside.out"
    res = cluster.run(["sbatch", "--wait", "-o", out_file], env=WRONG, input=script)
    text = Path(out_file).read_text()
    os.unlink(out_file)
    assert res.returncode == 0, res.stderr + text
    wrong = [line for line in text.splitlines() if line.startswith("wrong: sif-image:")]
    none = [line for line in text.splitlines() if line.startswith("none: sif-image:")]
    assert len(wrong) == 1 and "dm-crypt" in wrong[0], text
    assert len(none) == 1 and "no key was given" in none[0], text

