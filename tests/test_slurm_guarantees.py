"""Guarantees of docs/security-model.md and README.md that need a real Slurm (on the host, plain
images): each test fails if the protection it names is removed (docs/testing.md records which
removal each one caught)."""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from slurm import PREFIX
from slurm.fixtures import (assert_one_error, cluster, plain_images, sif_lines,  # noqa: F401
                            slurm_cluster, wait_no_leftovers)
from spank_sif import options

pytestmark = [pytest.mark.slurm, pytest.mark.root]

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ the job-control environment

def _job_id(text: str) -> str:
    return re.search(r"(?:job|JobId=)\s*(\d+)", text).group(1)


def _holding(root: Path, needles: list[bytes], skip=()) -> list[str]:
    """Files under ``root`` (but ``skip``) that contain any of ``needles``."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and path not in skip:
            data = path.read_bytes()
            found += [f"{path} holds {needle!r}" for needle in needles if needle in data]
    return found


def _saved_after(cluster, since: float, timeout: float = 60) -> None:
    """Until slurmctld has written its job state after ``since`` (it saves in the background)."""
    state = cluster.root / "state" / "job_state"
    deadline = time.monotonic() + timeout
    while not (state.exists() and state.stat().st_mtime > since):
        assert time.monotonic() < deadline, "slurmctld did not save its job state"
        time.sleep(0.5)


def _job_scripts_env(cluster, job: str) -> dict[str, str]:
    """What the job's prolog and epilog were handed, by script ("prolog", "epilog")."""
    logs = cluster.root / "log"
    deadline = time.monotonic() + 60
    while not all((logs / f"{name}-env.{job}").exists() for name in ("prolog", "epilog")):
        assert time.monotonic() < deadline, f"job {job}: no prolog/epilog environment in {logs}"
        time.sleep(0.2)
    time.sleep(0.2)  # the epilog may still be writing
    return {name: (logs / f"{name}-env.{job}").read_text() for name in ("prolog", "epilog")}


def _what_slurmctld_keeps(cluster, job: str, needles: list[bytes], image: str, since: float) -> tuple[list, list]:
    """While job ``job`` runs: (where slurmctld shows or keeps any of ``needles``, except in the
    batch job environment Slurm itself stores; where it keeps them there: the security model's
    residual risk). Also checks that the places looked at hold what they should: the job, and its
    job-control environment (the image's path)."""
    shown = cluster.run(["scontrol", "show", "job", "-dd", job], user="root")
    assert shown.returncode == 0 and f"JobId={job} " in shown.stdout, shown.stdout + shown.stderr
    found = [f"scontrol show job holds {n!r}" for n in needles if n.decode() in shown.stdout]
    _saved_after(cluster, since)
    state = cluster.root / "state"
    assert _holding(state, [image.encode()]) != [], "the job-control environment is saved with the job"
    slurms_own = {p for p in state.rglob("environment") if p.parent.name == f"job.{job}"}
    kept_by_slurm = [p.name for p in slurms_own if any(n in p.read_bytes() for n in needles)]
    return found + _holding(state, needles, skip=slurms_own), kept_by_slurm


def _wait_running(cluster, job: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while cluster.run(["squeue", "-h", "-j", job, "-o", "%T"], user="root").stdout.strip() != "RUNNING":
        assert time.monotonic() < deadline, f"job {job} does not run"
        time.sleep(0.2)


def test_key_variables_never_reach_the_job_control_environment(cluster, plain_images):
    """Guarantee 8: a key in the submit environment (srun and sbatch, passphrase and PEM data)
    reaches neither what slurmctld shows or keeps of the job (scontrol show job, its state files,
    its log) nor what the job's prolog and epilog are handed (the job-control environment,
    SPANK_*), where the plugin does put the image's path, which shows the check looks in the right
    place. The one copy Slurm itself keeps, a batch job's environment, is the residual risk the
    security model names, and the only file allowed to hold the key."""
    passphrase = "passphrase-" + os.urandom(8).hex()
    pem_body = os.urandom(12).hex()
    pem_data = f"-----BEGIN RSA PRIVATE KEY-----\n{pem_body}\n-----END RSA PRIVATE KEY-----\n"
    env = {"APPTAINER_ENCRYPTION_PASSPHRASE": passphrase, "SINGULARITY_ENCRYPTION_PEM_DATA": pem_data}
    needles = [passphrase.encode(), pem_body.encode()]
    image = str(plain_images["plain"])

    since = time.time()
    step = subprocess.Popen(["srun", f"--sif-image={image}", "sh", "-c", "echo running; sleep 4"],
                            env=cluster.env("sifuser", **env), user="sifuser", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert step.stdout.readline() == "running\n"
        (srun_job,) = cluster.run(["squeue", "-h", "-o", "%i"], user="root").stdout.split()
        assert _what_slurmctld_keeps(cluster, srun_job, needles, image, since) == ([], [])  # srun: no copy at all
    finally:
        _, err = step.communicate(timeout=120)
    assert step.returncode == 0 and sif_lines(err) == [], err

    since = time.time()
    batch = cluster.run(["sbatch", f"--sif-image={image}", "-o", "/dev/null", "--wrap", "srun sleep 4"], env=env)
    assert batch.returncode == 0, batch.stderr
    batch_job = _job_id(batch.stdout)
    _wait_running(cluster, batch_job)
    assert _what_slurmctld_keeps(cluster, batch_job, needles, image, since) == ([], ["environment"])
    assert wait_no_leftovers(cluster) == []

    for job in (srun_job, batch_job):
        handed = _job_scripts_env(cluster, job)
        assert f"SPANK_{options.OPTION_ENV}={image}" in handed["prolog"].splitlines(), (job, handed["prolog"])
        for name, text in handed.items():
            assert not [n for n in needles if n.decode() in text], (job, name)
    for log in ("slurmctld", "slurmd"):
        assert not [n for n in needles if n.decode() in cluster.log(log)], log


# ------------------------------------------------------------------ a plugin for another Slurm

def _headers_of_another_minor(dest: Path) -> tuple[str, str]:
    """A copy of the installed Slurm headers whose SLURM_VERSION_NUMBER names the next minor
    release (same major): what a plugin built on a machine with another Slurm would carry.
    Returns (the installed version, the patched one) as major.minor."""
    shutil.copytree("/usr/include/slurm", dest / "slurm")
    header = dest / "slurm" / "slurm_version.h"
    text = header.read_text()
    number = int(re.search(r"#define SLURM_VERSION_NUMBER (0x[0-9a-fA-F]+)", text).group(1), 16)
    other = number + 0x100
    header.write_text(text.replace(f"{number:#x}", f"{other:#x}"))
    assert f"{other:#x}" in header.read_text()

    return _major_minor(number), _major_minor(other)


def _major_minor(number: int) -> str:
    """22.05 for SLURM_VERSION_NUMBER 0x160508, as Slurm writes versions."""
    return f"{number >> 16}.{(number >> 8) & 0xff:02d}"


def test_a_plugin_built_for_another_slurm_is_refused_with_a_clear_line(cluster, plain_images, tmp_path):
    """README: the plugin is built against the installed Slurm and refuses other major.minor
    versions. Built from this checkout against headers that say the next minor release and loaded
    as the site's required plugin: no task runs, with or without an image, and srun says why in a
    clear line naming the versions (Slurm's loader's, or the shim's own)."""
    include = tmp_path / "include"
    installed, other = _headers_of_another_minor(include)
    python = f"{PREFIX}/bin/python3"
    build = subprocess.run([python, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "temp")], cwd=REPO, capture_output=True, text=True,
                           env=dict(os.environ, CFLAGS=f"-I{include}", SPANK_SIF_PYTHON=python), check=False)
    assert build.returncode == 0, build.stderr
    (plugin,) = (tmp_path / "lib" / "spank_sif").glob("_plugin*.so")
    # The object exports only what Slurm and Python look up: ask it through its Python module.
    ask = ("import importlib.util, sys; "
           "spec = importlib.util.spec_from_file_location('spank_sif._plugin', sys.argv[1]); "
           "plugin = importlib.util.module_from_spec(spec); spec.loader.exec_module(plugin); "
           "print(plugin.lib.shim_slurm_version())")
    built_for = subprocess.run([python, "-c", ask, str(plugin)], capture_output=True, text=True, check=True).stdout
    assert _major_minor(int(built_for)) == other != installed
    loaded = cluster.root / "other-minor-plugin.so"  # every user can reach it (the cluster root is 0755)
    shutil.copyfile(plugin, loaded)
    os.chmod(loaded, 0o755)
    cluster.plugstack.write_text(f"required {loaded} python={python} config={cluster.site_config} "
                                 f"state_dir={cluster.state_dir}\n")
    try:
        for argv in (["srun", f"--sif-image={plain_images['plain']}", "echo", "task ran"],
                     ["srun", "echo", "task ran"]):
            out = cluster.run(argv)
            assert out.returncode != 0 and "task ran" not in out.stdout, out.stdout + out.stderr
            # Slurm's loader refuses it first (SPANK_PLUGIN puts the headers' version in the plugin);
            # the shim's own check (its init callback) says the same, with what to do, if it loads.
            slurms = (f"srun: plugin_load_from_file: Incompatible Slurm plugin {loaded} version "
                      f"({other}.{int(built_for) & 0xff})")
            shims = f"srun: error: sif-image: plugin built for Slurm {other} but this is Slurm {installed}."
            lines = out.stderr.splitlines()
            assert slurms in lines or any(line.startswith(shims) for line in lines), out.stderr
    finally:
        cluster.set_plugin(True)
    assert cluster.run(["srun", "echo", "task ran"]).stdout == "task ran\n"  # the real plugin loads again
