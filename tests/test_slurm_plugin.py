"""The plugin under a real Slurm 22.05 (slurmctld + slurmd started here), jobs run as ordinary users.

Everything that needs no dm-crypt: loading, --help, option propagation (srun, sbatch, salloc,
nested sruns, the SLURM_SIF_IMAGE default), plain SIF images mounted through loop + squashfs, every
error path the host kernel allows, and a crashed step cleaned up by the epilog. Each error: one
'sif-image:' line on the user's stderr, a non-zero exit, nothing left on the node.
"""
import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from slurm import PREFIX
from slurm.fixtures import (HELLO, assert_one_error, assert_saw_nothing, buggy_python, cluster,  # noqa: F401
                            kill_step, leftovers, looks_for_the_mount, mount_point, plain_images,
                            sif_lines, site_yaml, slurm_cluster, wait_no_leftovers)

pytestmark = [pytest.mark.slurm, pytest.mark.root]

SHOW = 'echo "root=$SIF_IMAGE_ROOT image=$SLURM_SIF_IMAGE"; cat "$SIF_IMAGE_ROOT/hello.txt"'


def user_copy(cluster, image, user="sifuser", name="app.sif", owner="root"):
    """A copy of ``image`` in the user's home (for relative paths). Root's by default: the site's
    default kernel_mount (encrypted-only) mounts a plain image only when nobody but root can
    change it."""
    home = f"/home/{user}"
    dest = os.path.join(home, name)
    if os.path.lexists(dest):  # a new file: an old one keeps its owner
        os.unlink(dest)
    with open(image, "rb") as src, open(dest, "wb") as out:
        out.write(src.read())
    os.chmod(dest, 0o644)
    if owner != "root":
        os.chown(dest, *_ids(owner))
    return dest


def _ids(user):
    import pwd
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


# ------------------------------------------------------------------ loading, help, zero cost

@pytest.mark.parametrize("command", ["srun", "sbatch", "salloc"])
def test_help_lists_the_option(cluster, command):
    out = cluster.run([command, "--help"])
    assert "--sif-image=PATH" in out.stdout, out.stdout + out.stderr
    assert "SLURM_SIF_IMAGE" in out.stdout


def test_steps_without_image_never_start_python(cluster, plain_images):
    """With python= pointing nowhere, Python cannot start: jobs without --sif-image must still run
    (srun, its step, the epilog), and a job with it must fail closed and say why."""
    cluster.set_plugin(True, extra=["python=/nonexistent/bin/python3"])
    ok = cluster.run(["srun", "-n2", "--overcommit", "sh", "-c", "echo ran"])
    assert ok.returncode == 0 and ok.stdout.count("ran") == 2, ok.stderr
    assert sif_lines(ok.stderr) == []
    batch = cluster.run(["sbatch", "--wait", "-o", "/dev/null", "--wrap", "true"])
    assert batch.returncode == 0, batch.stderr
    cluster.wait_jobs_done()
    assert "drain" not in cluster.run(["sinfo", "-h", "-o", "%T"], user="root").stdout
    bad = cluster.run(["srun", f"--sif-image={plain_images['plain']}", "true"])
    assert bad.returncode != 0
    assert "cannot start the plugin's Python: python=/nonexistent/bin/python3" in bad.stderr


# ------------------------------------------------------------------ plain images, option propagation

def test_srun_mounts_a_plain_image(cluster, plain_images):
    out = cluster.run(["srun", f"--sif-image={plain_images['plain']}", "sh", "-c", SHOW])
    assert out.returncode == 0, out.stderr
    assert f"root={mount_point(cluster)} image={plain_images['plain']}" in out.stdout
    assert HELLO.decode() in out.stdout
    assert sif_lines(out.stderr) == []
    assert wait_no_leftovers(cluster) == []


def test_relative_path_and_several_tasks(cluster, plain_images):
    image = user_copy(cluster, plain_images["plain"])
    out = cluster.run(["srun", "-n", "3", "--overcommit", "--sif-image=app.sif", "sh", "-c", SHOW])
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(HELLO.decode()) == 3
    assert f"image={image}" in out.stdout
    assert wait_no_leftovers(cluster) == []


def test_environment_default(cluster, plain_images):
    out = cluster.run(["srun", "sh", "-c", SHOW], env={"SLURM_SIF_IMAGE": str(plain_images["plain"])})
    assert out.returncode == 0 and HELLO.decode() in out.stdout, out.stderr
    off = cluster.run(["srun", "--sif-image=", "sh", "-c", 'echo "[$SIF_IMAGE_ROOT]"'],
                      env={"SLURM_SIF_IMAGE": str(plain_images["plain"])})
    assert off.returncode == 0 and "[]" in off.stdout, off.stderr


def test_key_variables_do_not_reach_the_tasks(cluster, plain_images):
    env = {"APPTAINER_ENCRYPTION_PASSPHRASE": "hunter2", "SINGULARITY_ENCRYPTION_PEM_DATA": "x"}
    out = cluster.run(["srun", f"--sif-image={plain_images['plain']}", "env"], env=env)
    assert out.returncode == 0, out.stderr
    assert "_ENCRYPTION_" not in out.stdout
    assert "hunter2" not in cluster.log("slurmd")
    # Without an image the plugin leaves the job's environment alone.
    plain = cluster.run(["srun", "env"], env=env)
    assert "APPTAINER_ENCRYPTION_PASSPHRASE=hunter2" in plain.stdout


def test_sbatch_script_and_nested_sruns(cluster, plain_images):
    image = user_copy(cluster, plain_images["plain"])
    other = user_copy(cluster, plain_images["plain"], name="other.sif")
    script = """#!/bin/sh
#SBATCH --sif-image=app.sif
echo "batch $SIF_IMAGE_ROOT $SLURM_SIF_IMAGE"; cat "$SIF_IMAGE_ROOT/hello.txt"
srun sh -c 'echo "nested $SLURM_SIF_IMAGE"; cat "$SIF_IMAGE_ROOT/hello.txt"'
srun --sif-image=other.sif sh -c 'echo "own $SLURM_SIF_IMAGE"'
srun --sif-image= sh -c 'echo "none [$SIF_IMAGE_ROOT]"'
"""
    out_file = "/home/sifuser/batch.out"
    res = cluster.run(["sbatch", "--wait", "-o", out_file], input=script)
    assert res.returncode == 0, res.stderr
    text = open(out_file).read()
    os.unlink(out_file)
    assert f"batch {mount_point(cluster)} {image}" in text
    assert f"nested {image}" in text
    assert f"own {other}" in text
    assert "none []" in text
    assert text.count(HELLO.decode()) == 2
    assert wait_no_leftovers(cluster) == []


def test_salloc(cluster, plain_images):
    out = cluster.run(["salloc", f"--sif-image={plain_images['plain']}", "srun", "sh", "-c", SHOW])
    assert out.returncode == 0, out.stderr
    assert HELLO.decode() in out.stdout
    assert wait_no_leftovers(cluster) == []


def test_other_users_do_not_see_the_mount(cluster, plain_images):
    job = subprocess.Popen(
        ["srun", f"--sif-image={plain_images['plain']}", "sh", "-c",
         'cat "$SIF_IMAGE_ROOT/hello.txt"; sleep 20'],
        env=cluster.env("sifuser"), user="sifuser", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert job.stdout.readline() == HELLO.decode()
        other = cluster.run(["srun", "--oversubscribe", "sh", "-c", looks_for_the_mount(cluster)],
                            user="sifother")
        assert_saw_nothing(other, "sifother")
        assert job.poll() is None, "the image's job ended before the other user looked"
        with open("/proc/self/mountinfo") as f:
            assert f" {mount_point(cluster)} " not in f.read()
    finally:
        job.send_signal(signal.SIGINT)
        job.communicate(timeout=60)
    assert wait_no_leftovers(cluster) == []


# ------------------------------------------------------------------ errors

ERRORS = [
    # image key (or literal path), extra site config, words expected in the one line
    ("/nonexistent/app.sif", "", ["/nonexistent/app.sif", "does not exist"]),
    ("root_only", "", ["cannot read"]),
    ("not_sif", "", ["not a SIF"]),
    ("gocryptfs", "", ["gocryptfs"]),
    ("plain", "allowed_image_paths: [{allowed}]\n", ["allowed"]),
    ("plain", "allow_unencrypted: false\n", ["encrypt"]),
    ("encrypted", "", ["dm-crypt"]),
    ("plain", "mount_point: not/absolute\n", ["spank_sif.yaml", "mount_point"]),
    ("plain", "kdf_max_memory_kib: lots\n", ["spank_sif.yaml", "kdf_max_memory_kib"]),
]


@pytest.mark.parametrize("image,config,words", ERRORS, ids=[
    "missing", "unreadable-by-user", "not-sif", "gocryptfs", "outside-allowed", "unencrypted-refused",
    "no-dm-crypt", "bad-config-mount-point", "bad-config-type"])
def test_errors_are_one_line_and_leave_nothing(cluster, plain_images, image, config, words):
    path = plain_images.get(image, image)
    cluster.write_site_config(site_yaml(cluster, config.format(allowed=plain_images["allowed"])))
    out = cluster.run(["srun", "-n", "2", "--overcommit", f"--sif-image={path}", "sh", "-c", "echo task ran"],
                      env={"APPTAINER_ENCRYPTION_PASSPHRASE": "secret-pass"})
    assert_one_error(out, *words)
    assert "task ran" not in out.stdout
    assert "secret-pass" not in out.stderr + cluster.log("slurmd")
    assert wait_no_leftovers(cluster) == []


def test_bad_plugstack_argument_fails_closed(cluster, plain_images):
    cluster.set_plugin(True, extra=["colour=blue"])
    out = cluster.run(["srun", f"--sif-image={plain_images['plain']}", "true"])
    assert_one_error(out, "plugstack.conf", "colour=blue")


def test_bad_path_syntax_fails_on_the_submit_side(cluster):
    out = cluster.run(["srun", "--sif-image=dir/", "true"])
    assert_one_error(out, "directory")


# ------------------------------------------------------------------ crash: the epilog sweeps

def test_killed_slurmstepd_is_cleaned_up_by_the_epilog(cluster, plain_images):
    job = subprocess.Popen(
        ["srun", f"--sif-image={plain_images['plain']}", "sh", "-c",
         'cat "$SIF_IMAGE_ROOT/hello.txt"; sleep 60'],
        env=cluster.env("sifuser"), user="sifuser", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert job.stdout.readline() == HELLO.decode()
        assert leftovers(cluster), "a running step should hold a loop device and records"
        kill_step(cluster)
    finally:
        try:
            job.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            job.kill()
            job.communicate()
    subprocess.run(["scancel", "-u", "sifuser"], env=cluster.env(), capture_output=True)
    time.sleep(1)
    assert wait_no_leftovers(cluster, timeout=60) == []


# ------------------------------------------------------------------ crash: the admin's stale sweep

def test_stale_sweep_asks_the_real_slurm(cluster, plain_images, tmp_path):
    """`spank-sif cleanup --stale` as an admin runs it on a node: it asks this node's slurmstepds
    (scontrol listpids) which jobs still run, sweeps a job that does not (here: records of job 777,
    which never ran, made by an admin 'open'), and leaves a running job's image alone."""
    from spank_sif import lifecycle
    from spank_sif.errors import SystemSetupError

    job = subprocess.Popen(
        ["srun", f"--sif-image={plain_images['plain']}", "sh", "-c",
         'cat "$SIF_IMAGE_ROOT/hello.txt"; read line; cat "$SIF_IMAGE_ROOT/hello.txt"'],
        env=cluster.env("sifuser"), user="sifuser", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    cli = [f"{PREFIX}/bin/spank-sif"]
    target = tmp_path / "stale"
    target.mkdir()
    try:
        assert job.stdout.readline() == HELLO.decode()
        running = cluster.run(["squeue", "-h", "-o", "%A"], user="root").stdout.split()
        assert len(running) == 1
        opened = subprocess.run([*cli, "open", str(plain_images["plain"]), str(target), "--user", "sifuser",
                                 "--job", "777.0", "--config", str(cluster.site_config)],
                                env=cluster.env(), capture_output=True, text=True)
        assert opened.returncode == 0, opened.stderr
        with lifecycle_env(cluster):
            assert lifecycle.job_running_here(running[0]) is True
            assert lifecycle.job_running_here("777") is False  # another job runs: "no steps for job"
        swept = subprocess.run([*cli, "cleanup", "--stale", "--config", str(cluster.site_config)],
                               env=cluster.env(), capture_output=True, text=True)
        assert swept.returncode == 0, swept.stderr
        assert str(target) in swept.stdout and not (target / "hello.txt").exists()
        jobs = json.loads(subprocess.run([*cli, "list", "--json", "--config", str(cluster.site_config)],
                                         env=cluster.env(), capture_output=True, text=True).stdout)
        assert [j["job"].split(".")[0] for j in jobs] == running
        out, err = job.communicate("go\n", timeout=90)  # the running job still reads its image
        assert job.returncode == 0 and out == HELLO.decode(), err
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
        if os.path.ismount(target):  # the sweep failed: leave nothing behind anyway
            subprocess.run([*cli, "close", str(target), "--config", str(cluster.site_config)], env=cluster.env())
    assert wait_no_leftovers(cluster, timeout=60) == []
    with lifecycle_env(cluster):
        assert lifecycle.job_running_here(running[0]) is False  # ended: "does not exist on node"
    without_slurm = subprocess.run([*cli, "cleanup", "--stale", "--config", str(cluster.site_config)],
                                   env={"PATH": "/usr/bin:/bin", "SLURM_CONF": "/nonexistent/slurm.conf"},
                                   capture_output=True, text=True)
    assert without_slurm.returncode == 0, "no records left: nothing to ask Slurm about"
    with lifecycle_env(cluster, SLURM_CONF="/nonexistent/slurm.conf"), pytest.raises(SystemSetupError):
        lifecycle.job_running_here("777")  # Slurm cannot be asked: fail closed


@contextlib.contextmanager
def lifecycle_env(cluster, **extra):
    """This process's environment as a node's admin shell has it (scontrol finds the cluster)."""
    saved = dict(os.environ)
    os.environ.update(cluster.env(), **extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ------------------------------------------------------------------ the site's log level

@pytest.mark.parametrize("level, logged", [("info", False), ("verbose", True)])
def test_log_level_says_what_the_plugin_does_and_never_a_key(cluster, plain_images, level, logged):
    """slurmd's log (the cluster logs at verbose) gets the engine's steps only from log_level:
    verbose up; the key variable's value never appears whatever the level."""
    cluster.write_site_config(site_yaml(cluster, f"log_level: {level}\n"))
    log = cluster.root / "log" / "slurmd.log"
    before = len(log.read_text(errors="replace"))
    out = cluster.run(["srun", f"--sif-image={plain_images['plain']}", "true"],
                      env={"APPTAINER_ENCRYPTION_PASSPHRASE": "log-secret-1234"})
    assert out.returncode == 0, out.stderr
    assert wait_no_leftovers(cluster) == []
    new = log.read_text(errors="replace")[before:]
    lines = [line for line in new.splitlines() if "sif-image:" in line]
    steps = ("opened as sifuser", "loop device /dev/loop", "removed loop")
    assert all(any(s in line for line in lines) for s in steps) == logged, lines
    assert "log-secret-1234" not in new


# ------------------------------------------------------------------ security: what reaches users

# srun's verbosity: -vvv is srun's own; --slurmd-debug raises what slurmstepd and its tasks copy
# from their log to the job's stderr (Slurm 22.05: errors always; info, verbose, debug with it).
VERBOSITY = {"quiet": [], "srun -vvv": ["-vvv"], "slurmd-debug": ["--slurmd-debug=4"],
             "both": ["-vvv", "--slurmd-debug=4"]}


@pytest.fixture
def read_only_dir(cluster):
    """A directory on a read-only mount (a diskless node's root, as the plugin sees it)."""
    path = cluster.root / "read-only"
    path.mkdir(exist_ok=True)
    os.chmod(path, 0o755)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("verbosity", VERBOSITY)
def test_mount_point_that_cannot_be_created_is_one_line_naming_the_setting(cluster, plain_images,
                                                                            read_only_dir, verbosity):
    """mount_point on a read-only file system (EROFS when the task creates it): one line for the
    user naming the site key and file, however verbose srun is; no traceback anywhere."""
    target = read_only_dir / "sif"
    cluster.write_site_config(f"mount_point: {target}\n")
    log = cluster.root / "log" / "slurmd.log"
    before = len(log.read_text(errors="replace"))
    # Two tasks, one line; with --slurmd-debug one task (the tasks' debug lines share the pipe and
    # can interleave with another task's line mid-way).
    tasks = "-n2" if verbosity in ("quiet", "srun -vvv") else "-n1"
    out = cluster.run(["srun", *VERBOSITY[verbosity], tasks, "--overcommit",
                       f"--sif-image={plain_images['plain']}", "sh", "-c", "echo task ran"])
    line = assert_one_error(out, str(target), "Read-only file system", "'mount_point' in",
                            str(cluster.site_config))
    assert "task ran" not in out.stdout
    assert "Traceback" not in log.read_text(errors="replace")[before:]
    assert wait_no_leftovers(cluster) == [], line


INJECTED = [("srun", "remote:task_init_privileged", "quiet"),
            ("srun", "remote:task_init_privileged", "srun -vvv"),
            ("srun", "remote:task_init_privileged", "slurmd-debug"),
            ("srun", "remote:task_init_privileged", "both"),
            ("srun", "remote:user_init", "both"), ("srun", "remote:init_post_opt", "both"),
            ("srun", "local:init_post_opt", "both"),
            ("srun", "remote:exit", "both"),
            ("sbatch", "remote:task_init_privileged", "quiet"), ("sbatch", "remote:exit", "quiet")]


@pytest.mark.parametrize("command,callback,verbosity", INJECTED)
def test_a_bug_shows_users_one_line_and_its_traceback_only_to_the_admin(
        cluster, plain_images, buggy_python, command, callback, verbosity):
    """A bug (an exception the engine does not expect) in a callback: the user sees the fixed
    internal-error line, never the traceback or the exception's text, in srun's stderr or a batch
    job's output, whatever srun's verbosity; slurmd's log has the traceback (made printable), or
    for srun itself the system log."""
    from spank_sif.callbacks import INTERNAL_ERROR, INTERNAL_ERROR_SUBMIT
    buggy_python.break_callback(callback)
    cluster.set_plugin(True, extra=[f"python={buggy_python.python}"])
    log = cluster.root / "log" / "slurmd.log"
    before = len(log.read_text(errors="replace"))
    task = "echo task ran"
    if command == "srun":
        out = cluster.run(["srun", *VERBOSITY[verbosity], f"--sif-image={plain_images['plain']}", "sh", "-c",
                           task])
        cluster.wait_jobs_done()  # srun may return before its step's exit callback ran
        seen = out.stdout + out.stderr
    else:
        output = "/home/sifuser/bug.out"
        out = cluster.run(["sbatch", "--wait", "-o", output, f"--sif-image={plain_images['plain']}",
                           "--wrap", f"srun {' '.join(VERBOSITY[verbosity])} sh -c '{task}'"])
        cluster.wait_jobs_done()
        seen = out.stdout + out.stderr + open(output).read()
        os.unlink(output)
    for secret in ("Traceback", "injected bug", "RuntimeError", "\x1b", "traceback marker"):
        assert secret not in seen, seen
    lines = sif_lines(seen)
    if callback == "remote:exit":
        # After the tasks. srun's connection is closed by then; a batch step's output file is
        # still slurmstepd's stderr (Slurm's own "exit() failed" lines land there): at most the
        # one fixed line.
        assert "task ran" in seen and set(lines) <= {f"sif-image: {INTERNAL_ERROR}"}, seen
        assert len(lines) == (command == "sbatch"), seen
    else:
        told = INTERNAL_ERROR_SUBMIT if callback.startswith("local:") else INTERNAL_ERROR
        assert lines and set(lines) == {f"sif-image: {told}"}, seen
        assert "task ran" not in seen, seen  # fail closed: no task runs without its image
    if callback.startswith("remote:"):
        new = log.read_text(errors="replace")[before:]
        name = callback.split(":")[1]
        assert "Traceback" in new and f"RuntimeError: injected bug in remote:{name} \\x1b[31m" in new
        assert "\x1b" not in new
    buggy_python.break_callback("")
    assert wait_no_leftovers(cluster) == []


# The site's kernel_mount policy on a node: plain images a user can change are refused by
# default, encrypted ones only under root-owned, before any key or dm-crypt work.
KERNEL_MOUNT = [
    # policy (None: the default), image, owner of the copy, words in the one line (None: it runs)
    (None, "plain", "sifuser", ["can be changed by its owner (sifuser)", "kernel_mount: encrypted-only"]),
    (None, "plain", "root", None),
    ("always", "plain", "sifuser", None),
    ("root-owned", "plain", "sifuser", ["kernel_mount: root-owned"]),
    ("root-owned", "encrypted", "sifuser", ["can be changed by its owner (sifuser)", "kernel_mount: root-owned"]),
    ("root-owned", "plain", "root", None),
]


@pytest.mark.parametrize("policy,image,owner,words", KERNEL_MOUNT)
def test_kernel_mount_policy_on_the_node(cluster, plain_images, policy, image, owner, words):
    cluster.write_site_config(site_yaml(cluster, f"kernel_mount: {policy}\n" if policy else ""))
    path = user_copy(cluster, plain_images[image], name=f"policy-{image}.sif", owner=owner)
    try:
        out = cluster.run(["srun", f"--sif-image={path}", "sh", "-c", 'cat "$SIF_IMAGE_ROOT/hello.txt"'],
                          env={"APPTAINER_ENCRYPTION_PASSPHRASE": "secret-pass"})
        if words is None:
            assert out.returncode == 0 and HELLO.decode() in out.stdout, out.stderr
        else:
            assert_one_error(out, *words)
    finally:
        os.unlink(path)
    assert wait_no_leftovers(cluster) == []


def test_paths_users_choose_reach_terminals_and_logs_escaped(cluster):
    """An image path with an escape sequence and a bell: the user's line and slurmd's log show
    them escaped, never raw."""
    log = cluster.root / "log" / "slurmd.log"
    before = len(log.read_text(errors="replace"))
    path = "/nonexistent/\x1b]0;owned\x07\x1b[2Japp.sif"
    out = cluster.run(["srun", f"--sif-image={path}", "true"])
    line = assert_one_error(out, "/nonexistent/\\x1b]0;owned\\x07\\x1b[2Japp.sif does not exist")
    new = log.read_text(errors="replace")[before:]
    assert "/nonexistent/\\x1b]0;owned" in new, new
    for raw in ("\x1b", "\x07"):
        assert raw not in out.stderr + out.stdout + new, line
    assert wait_no_leftovers(cluster) == []
