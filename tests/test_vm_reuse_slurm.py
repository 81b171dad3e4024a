"""One unlock per job per node through a real Slurm (the VM harness): batch jobs whose steps share
one mapping of an encrypted image, and the faults of issue 9 item 2.

What each step used is seen from inside its tasks and counted outside the engine: every task prints
the device-mapper name of the device mounted at ``$SIF_IMAGE_ROOT`` in its own mount namespace
(``/proc/self/mountinfo`` -> ``/sys/dev/block/MAJ:MIN/dm/name``). A mapping's name is made once, when
it is created, and carries the label of the step that created it and 8 random hex digits: steps
that print the same name used one mapping, made by one key derivation."""
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from slurm import PREFIX
from slurm.fixtures import (assert_one_error, cluster, kill_step, leftovers, slurm_cluster,  # noqa: F401
                            wait_no_leftovers)

pytestmark = [pytest.mark.vm, pytest.mark.slurm, pytest.mark.root]

NAME_SH = """\
#!/bin/sh
# Prints: LABEL <dm name of the device at $SIF_IMAGE_ROOT in this task's namespace> <hello.txt>
dev=
while read -r _id _parent majmin _root mnt _rest; do
    [ "$mnt" = "$SIF_IMAGE_ROOT" ] && dev=$majmin
done < /proc/self/mountinfo
echo "$1 $(cat /sys/dev/block/$dev/dm/name) $(cat "$SIF_IMAGE_ROOT/hello.txt")"
"""


@pytest.fixture
def work(cluster, ref_images):
    """A directory of sifuser's under the cluster's root (so that ``leftovers`` sees loop devices
    over its files), with the images, the passphrase and name.sh."""
    d = cluster.root / f"reuse-{time.monotonic_ns()}"
    d.mkdir(mode=0o755)
    entry = pwd.getpwnam("sifuser")
    shutil.copyfile(ref_images.fast_pass_4k, d / "img.sif")
    shutil.copyfile(ref_images.enc_pass, d / "slow.sif")  # cryptsetup's default KDF: seconds to derive
    (d / "name.sh").write_text(NAME_SH)
    for path in [d, *d.iterdir()]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    for path in d.iterdir():
        path.chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(ref_images) -> dict:
    return {"APPTAINER_ENCRYPTION_PASSPHRASE": ref_images.pass_file.read_text()}


def _names(text: str) -> dict[str, list[str]]:
    """label -> the mapping names its tasks printed (and each saw the image's hello.txt)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].startswith("spank-sif-"):
            assert parts[2] == "SPANK-SIF-REFERENCE-OK", line
            found.setdefault(parts[0], []).append(parts[1])
    return found


def _outputs(work: Path) -> str:
    return "; ".join(f"{p.name}: {p.read_text(errors='replace')!r}" for p in sorted(work.glob("*.out")) +
                     sorted(work.glob("*.err")))


def _sbatch(cluster, work: Path, script: str, env: dict, wait=True):
    argv = ["sbatch", "--parsable", "-o", str(work / "job.out"), "-e", str(work / "job.err")]
    if wait:
        try:
            res = cluster.run([*argv, "--wait"], input=script, env=env, cwd=str(work), timeout=900)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job did not end: {_outputs(work)}\n{cluster.log('slurmd')[-4000:]}") from None
        return res, (work / "job.out").read_text(), (work / "job.err").read_text()
    path = work / "job.sh"
    path.write_text(script)
    path.chmod(0o644)
    return subprocess.Popen([*argv, "--wait", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(work), user="sifuser",
                            env=cluster.env("sifuser", **env))


def test_a_batch_job_of_many_steps_unlocks_once_and_only_for_the_same_file_and_key(cluster, work, ref_images):
    img, sh = work / "img.sif", f"sh {work / 'name.sh'}"
    script = f"""#!/bin/sh
#SBATCH --sif-image={img} -n4 -O
date +%s; {sh} batch
for i in 1 2 3 4; do srun -n1 {sh} step$i; date +%s; done
srun -n4 {sh} tasks; date +%s
APPTAINER_ENCRYPTION_PASSPHRASE=wrong srun -n1 {sh} wrong-key 2> {work}/wrong-key.err; echo "wrong-key exit $?"
env -u APPTAINER_ENCRYPTION_PASSPHRASE srun -n1 {sh} no-key 2> {work}/no-key.err; echo "no-key exit $?"
sleep 0.1; touch {img}; srun -n1 {sh} touched
cp {img} {img}.new && mv {img}.new {img}; srun -n1 {sh} replaced
date +%s
"""
    res, out, err = _sbatch(cluster, work, script, _env(ref_images))
    assert res.returncode == 0, res.stderr + out + err
    names = _names(out)
    first = names["batch"][0]
    assert first.startswith(f"spank-sif-{res.stdout.strip()}.batch-"), first
    shared = ["batch", "step1", "step2", "step3", "step4", "tasks"]
    assert {label: set(names[label]) for label in shared} == {label: {first} for label in shared}, names
    assert len(names["tasks"]) == 4, names  # srun -n4: four tasks at once, one mapping
    assert names["touched"][0] != first
    assert names["replaced"][0] not in (first, names["touched"][0])
    for label, words in (("wrong-key", ["no keyslot"]), ("no-key", ["no key"])):
        assert label not in names, out
        assert f"{label} exit 0" not in out, out
        lines = [line for line in (work / f"{label}.err").read_text().splitlines() if "sif-image:" in line]
        assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert wait_no_leftovers(cluster) == [], leftovers(cluster)


def test_two_steps_racing_derive_once_and_both_run(cluster, work, ref_images):
    slow, sh = work / "slow.sif", f"sh {work / 'name.sh'}"
    script = f"""#!/bin/sh
#SBATCH -n2 -O
srun -n1 --overlap --sif-image={slow} {sh} a &
srun -n1 --overlap --sif-image={slow} {sh} b &
wait
"""
    res, out, err = _sbatch(cluster, work, script, _env(ref_images))
    assert res.returncode == 0, res.stderr + out + err
    names = _names(out)
    assert sorted(names) == ["a", "b"] and names["a"] == names["b"], out + err
    assert wait_no_leftovers(cluster) == [], leftovers(cluster)


def _wait_for(path: Path, timeout=240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{path} never written")


def _go(work: Path) -> None:
    go = work / "go"
    go.write_text("go\n")
    entry = pwd.getpwnam("sifuser")
    os.chown(go, entry.pw_uid, entry.pw_gid)


def _finish(job) -> tuple[str, str]:
    try:
        return job.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        job.kill()
        return job.communicate()


def test_a_step_killed_holding_the_mapping_leaves_it_to_later_steps_and_the_epilog(cluster, work, ref_images):
    img, sh = work / "img.sif", f"sh {work / 'name.sh'}"
    script = f"""#!/bin/sh
#SBATCH -n2 -O
srun -n1 --overlap --sif-image={img} sh -c "{sh} held > {work}/held.out; sleep 600" &
while [ ! -e {work}/go ]; do sleep 0.2; done
srun -n1 --overlap --sif-image={img} {sh} after > {work}/after.out
"""
    job = _sbatch(cluster, work, script, _env(ref_images), wait=False)
    try:
        held = _names(_wait_for(work / "held.out"))["held"]
        kill_step(cluster, "0")  # its slurmstepd dies holding the mapping: no exit callback
        _go(work)
        after = _names(_wait_for(work / "after.out"))["after"]
        assert after == held, (held, after)  # the dead step's hold did not take the mapping with it
    finally:
        _go(work)
        _finish(job)
    assert wait_no_leftovers(cluster, timeout=120) == [], leftovers(cluster)


def test_the_epilog_while_a_step_runs_leaves_the_tasks_their_mount_and_nothing_behind(cluster, work, ref_images):
    img, sh = work / "img.sif", f"sh {work / 'name.sh'}"
    script = f"""#!/bin/sh
srun -n1 --sif-image={img} sh -c '{sh} before; touch {work}/started
    while [ ! -e {work}/go ]; do sleep 0.2; done; {sh} after-epilog'
"""
    job = _sbatch(cluster, work, script, _env(ref_images), wait=False)
    try:
        deadline = time.monotonic() + 240
        while not (work / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        jid = cluster.run(["squeue", "-h", "-o", "%i"], user="root").stdout.split()[0]
        epilog = subprocess.run([f"{PREFIX}/bin/spank-sif", "epilog",
                                 "--job", jid, "--config", str(cluster.site_config)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert epilog.returncode == 0, epilog.stderr
        assert not (cluster.state_dir / jid).exists()  # every record went
        assert list(Path("/dev/mapper").glob(f"spank-sif-{jid}.*"))  # the kernel keeps the mounted mapping
        _go(work)
    finally:
        _go(work)
        _finish(job)
    names = _names((work / "job.out").read_text())
    assert names["after-epilog"] == names["before"], names  # the task read its image to the end
    assert wait_no_leftovers(cluster, timeout=120) == [], leftovers(cluster)
