"""--sif-container under a real Slurm 22.05 on this machine, with plain (unencrypted) images: every
task runs with the image as its root file system. Jobs run as the ordinary user sifuser.

What is checked: the image's files, identity, environment, PATH and working directory inside; the
root read-only; binds (site and user), allowed paths, symbolic-link targets that must not escape;
sbatch/salloc; mount mode unchanged without the option; and every fault a user can cause: one
'sif-image:' line, a non-zero exit, nothing left on the node.
"""
import os
import subprocess
from pathlib import Path

import pytest

import container_images
from slurm.fixtures import (assert_one_error, cluster, mount_point, plain_images, sif_lines,  # noqa: F401
                            site_yaml, slurm_cluster, wait_no_leftovers, write_image)

pytestmark = [pytest.mark.slurm, pytest.mark.root]

USER, OTHER = "sifuser", "sifother"
HOME = Path("/home") / USER
VAR, VALUE = container_images.IMAGE_VARIABLE


@pytest.fixture(scope="session")
def images(slurm_cluster):
    """The container images by variant (plain SIF files every test user can read)."""
    d = slurm_cluster.root / "container-images"
    d.mkdir(mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    return {variant: write_image(d / f"{variant}.sif", container_images.build_squashfs(d, variant).read_bytes())
            for variant in container_images.VARIANTS}


@pytest.fixture
def workdir():
    """A submit directory of the user's (outside the home), with a file to read inside."""
    path = Path("/var/tmp") / f"spank-sif-submit-{os.getpid()}"
    path.mkdir(mode=0o755, exist_ok=True)
    (path / "input.txt").write_text("data in the submit directory\n")
    uid, gid = _ids(USER)
    for p in (path, path / "input.txt"):
        os.chown(p, uid, gid)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _ids(user):
    import pwd
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def srun(cluster, image, *command, options=(), env=None, cwd=None, user=USER):
    return cluster.run(["srun", f"--sif-image={image}", "--sif-container", *options, *command],
                       env=env, cwd=cwd, user=user)


def sh(cluster, image, script, **kw):
    return srun(cluster, image, "sh", "-c", script, **kw)


@pytest.mark.parametrize("command", ["srun", "sbatch", "salloc"])
def test_help_lists_the_container_options(cluster, command):
    out = cluster.run([command, "--help"]).stdout
    for option in ("--sif-container ", "--sif-binds=SRC[:DST[:ro]],...", "--sif-workdir=PATH",
                   "SLURM_SIF_CONTAINER=1"):
        assert option in out, out


# ------------------------------------------------------------------ inside the container

def test_the_task_sees_the_images_files_identity_and_environment(cluster, images, workdir):
    script = (f'cat /etc/os-release; echo "user=$(id -un) whoami=$(whoami) home=$(echo ~{USER})'
              f' groups=$(id -G)";'
              f' echo "var=${VAR} root=$SIF_IMAGE_ROOT pwd=$(pwd)"; echo "path=$PATH"; hello-sif;'
              f' cat input.txt; grep NoNewPrivs /proc/self/status')
    out = sh(cluster, images["container"], script, cwd=workdir,
             env={"APPTAINER_ENCRYPTION_PASSPHRASE": "not-needed-but-secret"})
    assert out.returncode == 0, out.stderr
    assert container_images.OS_RELEASE.decode() in out.stdout
    uid, gid = _ids(USER)
    assert f"user={USER} whoami={USER} home={HOME} groups={gid}" in out.stdout
    assert f"var={VALUE} root=/ pwd={workdir}" in out.stdout
    assert "path=/opt/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in out.stdout
    assert container_images.HELLO_OUTPUT in out.stdout
    assert "data in the submit directory" in out.stdout
    assert "NoNewPrivs:\t1" in out.stdout
    assert sif_lines(out.stderr) == []
    assert wait_no_leftovers(cluster) == []


def test_a_command_only_the_image_has_is_found_on_its_path(cluster, images):
    assert not any(os.path.exists(os.path.join(d, "hello-sif")) for d in os.environ["PATH"].split(":"))
    out = srun(cluster, images["container"], "hello-sif")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == container_images.HELLO_OUTPUT


def test_key_variables_are_absent_and_host_only_ones_replaced(cluster, images):
    env = {"APPTAINER_ENCRYPTION_PASSPHRASE": "hunter2", "LD_PRELOAD": "/host/lib.so",
           "MY_JOB_VAR": "kept", VAR: "the-job-wins"}
    out = srun(cluster, images["container"], "env", env=env)
    assert out.returncode == 0, out.stderr
    assert "_ENCRYPTION_" not in out.stdout and "hunter2" not in out.stdout
    assert "LD_PRELOAD" not in out.stdout
    assert "MY_JOB_VAR=kept" in out.stdout and f"{VAR}=the-job-wins" in out.stdout
    assert "SIF_IMAGE_ROOT=/\n" in out.stdout
    assert "hunter2" not in cluster.log("slurmd")


def test_the_root_is_read_only_and_the_host_is_out_of_sight(cluster, images):
    # The test cluster's mount point is under /tmp, which the container binds from the host: the
    # container must not see its own work area there (an empty directory, as on the host).
    script = ("touch /new-file 2>&1; touch /etc/new-file 2>&1; touch /tmp/ok && echo tmp-writable;"
              f" echo work=[$(ls -A {mount_point(cluster)})]; cat /etc/debian_version 2>&1; true")
    out = sh(cluster, images["container"], script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Read-only file system") == 2, out.stdout
    assert "tmp-writable" in out.stdout and "work=[]" in out.stdout, out.stdout
    assert "debian_version': No such file" in out.stdout  # the host's /etc is not there


def test_several_tasks_each_enter(cluster, images):
    out = sh(cluster, images["container"], 'echo "$SLURM_PROCID $(cat /etc/os-release | head -1)"',
             options=["-n", "3", "--overcommit"])
    assert out.returncode == 0, out.stderr
    assert sorted(line.split()[0] for line in out.stdout.splitlines()) == ["0", "1", "2"]
    assert out.stdout.count("spank-sif test image") == 3
    assert wait_no_leftovers(cluster) == []


def test_working_directory_rules(cluster, images, workdir):
    # --sif-workdir wins; without it the submit directory; the home when the submit directory is
    # not bound (a site without "." in container_binds).
    out = sh(cluster, images["container"], "pwd", options=["--sif-workdir=/opt/app"], cwd=workdir)
    assert out.returncode == 0 and out.stdout.strip() == "/opt/app", out.stderr
    cluster.write_site_config(site_yaml(cluster, 'container_binds: [/proc, /dev, /tmp, "~"]\n'))
    out = sh(cluster, images["container"], 'pwd; echo "PWD=$PWD"', cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(HOME), f"PWD={HOME}"]


def test_mount_mode_is_unchanged_without_the_option(cluster, images):
    out = cluster.run(["srun", f"--sif-image={images['container']}", "sh", "-c",
                       'echo "root=$SIF_IMAGE_ROOT"; cat "$SIF_IMAGE_ROOT/etc/os-release"; '
                       'test -e /etc/debian_version && echo host-root'])
    assert out.returncode == 0, out.stderr
    assert f"root={mount_point(cluster)}" in out.stdout
    assert "spank-sif test image" in out.stdout and "host-root" in out.stdout


def test_site_default_and_environment_default(cluster, images):
    cluster.write_site_config(site_yaml(cluster, "container_default: true\n"))
    inside = cluster.run(["srun", f"--sif-image={images['container']}", "cat", "/etc/os-release"])
    assert "spank-sif test image" in inside.stdout, inside.stderr
    off = cluster.run(["srun", f"--sif-image={images['container']}", "sh", "-c", 'echo "$SIF_IMAGE_ROOT"'],
                      env={"SLURM_SIF_CONTAINER": "0"})
    assert off.stdout.strip() == mount_point(cluster), off.stderr
    cluster.write_site_config(site_yaml(cluster))
    env = cluster.run(["srun", f"--sif-image={images['container']}", "cat", "/etc/os-release"],
                      env={"SLURM_SIF_CONTAINER": "1"})
    assert "spank-sif test image" in env.stdout, env.stderr


# ------------------------------------------------------------------ binds

@pytest.fixture
def bind_dirs(cluster):
    """A user directory under an allowed root, one outside it, and one the user cannot read."""
    base = Path("/var/tmp") / f"spank-sif-binds-{os.getpid()}"
    dirs = {name: base / name for name in ("allowed/data", "elsewhere", "secret")}
    uid, gid = _ids(USER)
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        (path / "file.txt").write_text(f"{name}\n")
        if name != "secret":
            os.chown(path, uid, gid)
    os.chmod(base, 0o755)
    os.chmod(base / "allowed", 0o755)
    os.chmod(dirs["secret"], 0o700)
    yield dirs
    subprocess.run(["rm", "-rf", str(base)], check=False)


def test_user_binds_read_write_and_read_only(cluster, images, bind_dirs):
    data = bind_dirs["allowed/data"]
    cluster.write_site_config(site_yaml(cluster, f"allowed_bind_paths: [{data.parent}]\n"))
    script = ("cat /srv/in/file.txt /mnt/ro/file.txt /home/x/y/file.txt; touch /srv/in/w && echo rw-ok;"
              " touch /mnt/ro/w 2>&1; true")
    out = sh(cluster, images["container"], script,
             options=[f"--sif-binds={data}:/srv/in,{data}:/mnt/ro:ro,{data}:/home/x/y"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("allowed/data") == 3 and "rw-ok" in out.stdout, out.stdout
    assert "Read-only file system" in out.stdout
    assert (data / "w").exists()
    assert not Path("/srv/in").exists() and not Path("/mnt/ro").exists()  # nothing made on the host
    assert wait_no_leftovers(cluster) == []


def test_symbolic_links_in_the_image_never_lead_out(cluster, images, bind_dirs):
    data = bind_dirs["allowed/data"]
    # /escape -> /../../etc: resolved inside the image, so the bind lands on the image's /etc.
    out = sh(cluster, images["container"], "cat /etc/sub/file.txt; ls /etc",
             options=[f"--sif-binds={data}:/escape/sub"])
    assert out.returncode == 0, out.stderr
    assert "allowed/data" in out.stdout and "os-release" in out.stdout
    assert not Path("/etc/sub").exists()


def test_site_binds_the_image_cannot_take_are_skipped(cluster, images):
    # a user's bind there fails the task (test_faults_...); the site's is left out, with a log line
    cluster.write_site_config(site_yaml(cluster, 'container_binds: [/proc, /dev, /tmp, "/var/tmp:/escape",'
                                                 ' "/var/tmp:/etc/os-release", /nonexistent/site/path]\n'
                                                 "log_level: verbose\n"))
    out = sh(cluster, images["container"], "cat /etc/os-release")
    assert out.returncode == 0, out.stderr
    assert out.stdout == container_images.OS_RELEASE.decode() and sif_lines(out.stderr) == []
    assert "site bind /var/tmp skipped: bind target /escape is a symbolic link" in cluster.log("slurmd")


def test_relative_bind_source_and_sbatch_applies_to_every_step(cluster, images, workdir):
    (workdir / "sub").mkdir()
    os.chown(workdir / "sub", *_ids(USER))
    (workdir / "sub" / "f").write_text("relative source\n")
    script = f"""#!/bin/sh
#SBATCH --sif-image={images['container']}
#SBATCH --sif-container
#SBATCH --sif-binds=sub:/sub
echo "batch root=$SIF_IMAGE_ROOT"
test -e /etc/debian_version && echo "batch on the host"
srun cat /etc/os-release /sub/f
srun --sif-image= sh -c 'echo "plain step [$SIF_IMAGE_ROOT]"'
SLURM_SIF_CONTAINER=0 srun sh -c 'echo "mount step $SIF_IMAGE_ROOT"'
"""
    out_file = workdir / "batch.out"
    res = cluster.run(["sbatch", "--wait", "-o", str(out_file)], input=script, cwd=workdir)
    assert res.returncode == 0, res.stderr
    text = out_file.read_text()
    assert f"batch root={mount_point(cluster)}" in text and "batch on the host" in text, text
    assert "spank-sif test image" in text and "relative source" in text, text
    assert "plain step []" in text and f"mount step {mount_point(cluster)}" in text, text
    assert "sif-image:" not in text
    assert wait_no_leftovers(cluster) == []


def test_salloc_passes_container_mode_to_its_sruns(cluster, images):
    out = cluster.run(["salloc", f"--sif-image={images['container']}", "--sif-container",
                       "srun", "cat", "/etc/os-release"])
    assert out.returncode == 0, out.stderr
    assert "spank-sif test image" in out.stdout


# ------------------------------------------------------------------ faults: one line, nothing left

FAULTS = [
    # variant, options, site config, words in the one line
    ("container", ["--sif-binds=/nonexistent/dir:/x"], "", ["bind source /nonexistent/dir", "does not exist"]),
    ("container", ["--sif-binds={secret}:/x"], "", ["cannot read bind source"]),
    ("container", ["--sif-binds={elsewhere}:/x"], "allowed_bind_paths: [{allowed}]\n",
     ["outside the directories", "allowed"]),
    ("container", ["--sif-binds={allowed}:/escape"], "", ["/escape", "symbolic link inside the image"]),
    ("container", ["--sif-binds={allowed}:/data"], "", ["/data", "symbolic link"]),
    ("container", ["--sif-binds={allowed}:/proc/new"], "", ["/proc/new", "bound from the host"]),
    ("container", ["--sif-binds=a:b:c:d"], "", ["SRC[:DST[:ro]]"]),
    ("container", ["--sif-workdir=/nonexistent"], "", ["--sif-workdir=/nonexistent"]),
    ("env_fails", [], "", ["95-broken.sh", "failed", "exit status 3", "missing licence file"]),
    ("env_hangs", [], "container_env_timeout: 2\n", ["95-slow.sh", "did not finish within 2 s"]),
]


@pytest.mark.parametrize("variant,opts,config,words", FAULTS, ids=[
    "bind-source-missing", "bind-source-unreadable", "bind-source-not-allowed", "bind-target-symlink",
    "bind-target-dangling-symlink", "bind-target-under-host-bind", "bind-syntax", "workdir-missing",
    "env-script-fails", "env-script-hangs"])
def test_faults_are_one_line_and_leave_nothing(cluster, images, bind_dirs, variant, opts, config, words):
    names = {"secret": bind_dirs["secret"], "elsewhere": bind_dirs["elsewhere"],
             "allowed": bind_dirs["allowed/data"]}
    cluster.write_site_config(site_yaml(cluster, config.format(allowed=bind_dirs["allowed/data"].parent)))
    out = sh(cluster, images[variant], "echo task ran", options=["-n2", "--overcommit",
                                                                 *(o.format(**names) for o in opts)])
    assert_one_error(out, *words)
    assert "task ran" not in out.stdout
    assert wait_no_leftovers(cluster) == []
    assert not Path("/etc/sub").exists()


def test_container_without_an_image_is_one_line(cluster, workdir):
    out = cluster.run(["srun", "--sif-container", "true"])
    assert_one_error(out, "--sif-container needs an image")
    out_file = workdir / "job.out"
    inside = cluster.run(["sbatch", "--wait", "-o", str(out_file), "--wrap",
                          "srun --sif-container echo task ran; echo srun=$?"], cwd=workdir)
    assert inside.returncode == 0, inside.stderr
    text = out_file.read_text()
    assert sif_lines(text) == ["sif-image: --sif-container needs an image: give --sif-image=PATH as well "
                               "(or set SLURM_SIF_IMAGE)"], text
    assert "srun=1" in text and "task ran" not in text


def test_a_program_missing_inside_gets_slurms_usual_line(cluster, images):
    out = srun(cluster, images["container"], "no-such-program")
    assert out.returncode != 0
    assert "No such file or directory" in out.stderr and "no-such-program" in out.stderr
    assert sif_lines(out.stderr) == [] and "Traceback" not in out.stderr
    assert wait_no_leftovers(cluster) == []


def test_an_image_without_a_shell_runs_with_the_jobs_environment(cluster, images):
    out = srun(cluster, images["no_shell"], "env", options=["-n2", "--overcommit"],
               env={"MY_JOB_VAR": "kept"})
    assert out.returncode == 0, out.stderr
    line = assert_one_line(out.stderr)
    assert "/bin/sh cannot run (No such file or directory)" in line and "environment scripts" in line
    assert out.stdout.count("MY_JOB_VAR=kept") == 2 and VAR not in out.stdout
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in out.stdout
    assert wait_no_leftovers(cluster) == []


def assert_one_line(stderr: str) -> str:
    lines = sif_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


def test_other_users_cannot_bind_what_they_cannot_read(cluster, images, workdir):
    os.chmod(workdir, 0o700)
    out = sh(cluster, images["container"], "true", options=[f"--sif-binds={workdir}:/w"], user=OTHER)
    assert_one_error(out, "cannot read bind source")
