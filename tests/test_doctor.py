"""``spank-sif doctor``: every check pointed at a real broken thing reports it with a fix, and passes
where this machine is fine; the command's lines, --json and exit status; on a kernel without
device-mapper it says so; on the VM node running the test cluster everything passes.

Checks are called in-process with their inputs as parameters (files made here with the wrong mode,
owner or type; a plugstack.conf without the line...). The command itself runs from the installed
prefix ($SPANK_SIF_PREFIX), whose plugin is built: re-install after changing the package.
"""
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest

from spank_sif import doctor
from spank_sif.cli import EXIT_CODES
from spank_sif.cli.doctor import EPILOG
from spank_sif.errors import ConfigError, StateError, SystemSetupError
from slurm.fixtures import cluster, slurm_cluster  # noqa: F401 - pytest fixtures

from slurm import PREFIX
SPANK_SIF = os.path.join(PREFIX, "bin", "spank-sif")
NAMES = ["kernel", "device-mapper", "loop", "libcryptsetup", "cryptsetup", "plugin", "plugstack",
         "config", "state-dir", "mount-point", "python"]
NODE, CONFIG, STATE = SystemSetupError.exit_code, ConfigError.exit_code, StateError.exit_code

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def failed_with(result, *words, code=NODE):
    """The check failed, its detail names the cause, and it says what to do."""
    assert not result.ok, result
    assert result.exit_code == code, result
    assert result.fix, result
    text = f"{result.detail} | {result.fix}"
    for word in words:
        assert word in text, (word, result)
    return result


@pytest.fixture
def world(tmp_path):
    """A directory every user can pass (pytest's tmp_path is under a root-only one)."""
    path = Path(tempfile.mkdtemp(prefix="sif-doctor-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def on_tmpfs():
    path = Path(tempfile.mkdtemp(prefix="sif-doctor-", dir="/dev/shm"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def user_uid() -> int:
    from engine_helpers import USER, ensure_users
    ensure_users()
    return pwd.getpwnam(USER).pw_uid


@pytest.fixture(scope="module")
def plugin() -> str:
    if not os.path.exists(SPANK_SIF):
        pytest.fail(f"{SPANK_SIF} missing: run scripts/install.sh")
    return subprocess.run([SPANK_SIF, "plugin-path"], capture_output=True, text=True, check=True).stdout.strip()


# ---------------------------------------------------------------- kernel


@root_only
def test_kernel_passes_for_drivers_this_kernel_has():
    result = doctor.check_kernel(modules=("loop",))
    assert result.ok, result
    assert "loop" in result.detail


@root_only
def test_kernel_reports_a_module_it_does_not_have():
    result = doctor.check_kernel(modules=("loop", "spank_sif_no_such_module"))
    failed_with(result, "lacks spank_sif_no_such_module", "modprobe", "boot a kernel")
    assert "loop" not in result.detail.split("lacks")[1]


def test_kernel_counts_built_in_drivers(tmp_path):
    (tmp_path / "modules.builtin").write_text("kernel/drivers/md/spank-sif-test.ko\n")
    assert doctor.check_kernel(modules=("spank_sif_test",), modules_dir=str(tmp_path), load=False).ok
    (tmp_path / "modules.builtin").write_text("")
    failed_with(doctor.check_kernel(modules=("spank_sif_test",), modules_dir=str(tmp_path), load=False),
                "lacks spank_sif_test")


# ---------------------------------------------------------------- device-mapper


no_device_mapper = pytest.mark.skipif(
    "device-mapper" in Path("/proc/misc").read_text().split(), reason="this kernel has device-mapper")


@no_device_mapper
def test_device_mapper_missing_from_this_kernel_is_reported():
    result = doctor.check_device_mapper()
    failed_with(result, "no device-mapper driver", "modprobe dm_mod")
    if os.path.exists("/dev/mapper/control"):
        assert "nothing answers" in result.detail


def fake_misc(tmp_path, minor=236) -> str:
    """A /proc/misc that says device-mapper is registered (what a kernel with it shows)."""
    path = tmp_path / "misc"
    path.write_text(f"237 loop-control\n{minor} device-mapper\n")
    return str(path)


def test_device_mapper_node_of_the_wrong_kind(tmp_path):
    regular = tmp_path / "control"
    regular.write_text("")
    for node in (regular, "/dev/null"):
        failed_with(doctor.check_device_mapper(str(node), fake_misc(tmp_path)),
                    "not device-mapper's character device 10:236", "dmsetup mknodes")
    failed_with(doctor.check_device_mapper(str(tmp_path / "missing"), fake_misc(tmp_path)),
                "No such file", "dmsetup mknodes")


@root_only
@no_device_mapper
def test_device_mapper_node_without_a_driver_does_not_answer(tmp_path):
    """The development machines' case: the right node, 10:236, and no driver behind it."""
    node = tmp_path / "control"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(10, 236))
    failed_with(doctor.check_device_mapper(str(node), fake_misc(tmp_path)), "does not answer")


# ---------------------------------------------------------------- loop devices


@root_only
def test_loop_devices_free_here():
    result = doctor.check_loop_devices()
    assert result.ok, result
    assert re.search(r"/dev/loop\d+", result.detail)


def test_loop_control_that_is_not_one(tmp_path):
    failed_with(doctor.check_loop_devices("/dev/null"), "no free loop device", "losetup")
    failed_with(doctor.check_loop_devices(str(tmp_path / "loop-control")), "cannot open", "modprobe loop")


# ---------------------------------------------------------------- libcryptsetup and cryptsetup


def test_libcryptsetup_loads_here():
    result = doctor.check_libcryptsetup()
    assert result.ok, result
    assert re.search(r"libcryptsetup\.so\.12\.\d+\.\d+ loads", result.detail)


def test_libcryptsetup_missing():
    result = failed_with(doctor.check_libcryptsetup("libspank-sif-missing.so.1"), "cannot load", "libcryptsetup12")
    assert result.status == "error"  # the plugin has no other way to open an encrypted image


def test_libcryptsetup_that_lacks_the_functions():
    """A library that loads but is not libcryptsetup."""
    result = doctor.check_libcryptsetup("libc.so.6")
    failed_with(result, "lacks crypt_activate_by_volume_key", "libcryptsetup12")


def test_cryptsetup_program_here():
    result = doctor.check_cryptsetup_program()
    assert result.ok, result
    assert re.search(r"cryptsetup 2\.\d+\.\d+", result.detail)


@root_only
def test_cryptsetup_program_others_can_change(world):
    copy = world / "cryptsetup"
    shutil.copy("/usr/sbin/cryptsetup", copy)
    copy.chmod(0o775)
    failed_with(doctor.check_cryptsetup_program([str(copy)]), "mode 775", "others can change", "chmod go-w")
    copy.chmod(0o755)
    assert doctor.check_cryptsetup_program([str(copy)]).ok
    os.chown(copy, user_uid(), 0)
    failed_with(doctor.check_cryptsetup_program([str(copy)]), f"owned by uid {user_uid()}", "chown root")


def test_cryptsetup_program_missing(tmp_path):
    failed_with(doctor.check_cryptsetup_program([str(tmp_path / "cryptsetup")]), "no cryptsetup program",
                "cryptsetup-bin")


# ---------------------------------------------------------------- the plugin's Slurm version


def header_version() -> int:
    header = Path("/usr/include/slurm/slurm_version.h").read_text()
    return int(re.search(r"#define SLURM_VERSION_NUMBER (0x[0-9a-fA-F]+)", header).group(1), 16)


def test_plugin_built_for_this_slurm():
    result = doctor.check_plugin(header_version())
    assert result.ok, result
    assert "slurmd -V" in result.detail


def test_plugin_built_for_another_slurm():
    other = header_version() + (1 << 16)  # next major version
    built = f"{other >> 16}.{other >> 8 & 0xFF:02d}"
    failed_with(doctor.check_plugin(other), f"built for Slurm {built}", "will not load it", "libslurm-dev")


def test_plugin_where_slurm_cannot_be_asked():
    failed_with(doctor.check_plugin(header_version(), commands=(("spank-sif-no-slurmd", "-V"), ("true",))),
                "cannot tell which Slurm", "no spank-sif-no-slurmd", "true: exit status 0")


# ---------------------------------------------------------------- plugstack.conf


def slurm_setup(d: Path, plugstack_text: str, conf_extra="PlugStackConfig={d}/etc/plugstack.conf\n") -> str:
    """slurm.conf naming a plugstack.conf that includes plugstack.conf.d/*.conf, which holds the text."""
    (d / "etc" / "plugstack.conf.d").mkdir(parents=True)
    (d / "etc" / "slurm.conf").write_text(f"ClusterName=x\n{conf_extra.format(d=d)}")
    (d / "etc" / "plugstack.conf").write_text("# site plugins\ninclude plugstack.conf.d/*.conf\n")
    (d / "etc" / "plugstack.conf.d" / "spank-sif.conf").write_text(plugstack_text)
    return str(d / "etc" / "slurm.conf")


def test_plugstack_line_found_through_include(tmp_path, plugin):
    conf = slurm_setup(tmp_path, f"# spank-sif\nrequired {plugin} config=/etc/x.yaml\n")
    result = doctor.check_plugstack(conf, plugin)
    assert result.ok, result
    assert result.detail.startswith(f"{tmp_path}/etc/plugstack.conf.d/spank-sif.conf:2: required {plugin}")
    assert doctor.installed_line(conf, plugin).args == ("config=/etc/x.yaml",)


def test_plugstack_default_is_next_to_slurm_conf(tmp_path, plugin):
    conf = slurm_setup(tmp_path, f"required {plugin}\n", conf_extra="")
    assert doctor.check_plugstack(conf, plugin).ok


def test_plugstack_config_from_an_included_slurm_conf(tmp_path, plugin):
    conf = slurm_setup(tmp_path, f"required {plugin}\n", conf_extra="include extra.conf\n")
    (tmp_path / "etc" / "elsewhere").mkdir()
    (tmp_path / "etc" / "elsewhere" / "plugstack.conf").write_text(f"optional {plugin}\n")
    (tmp_path / "etc" / "extra.conf").write_text(f"plugstackconfig={tmp_path}/etc/elsewhere/plugstack.conf\n")
    failed_with(doctor.check_plugstack(conf, plugin), "elsewhere/plugstack.conf:1", "'optional'", "required")


@pytest.mark.parametrize("text", ["", "# required {plugin}\n", "required /usr/lib/other_spank.so\n"],
                         ids=["empty", "commented-out", "other-plugin"])
def test_plugstack_without_the_line(tmp_path, plugin, text):
    conf = slurm_setup(tmp_path, text.format(plugin=plugin))
    failed_with(doctor.check_plugstack(conf, plugin), f"does not load {plugin}", "plugstack-line",
                "restart slurmd")


def test_plugstack_loading_another_install(tmp_path, plugin):
    other = "/opt/elsewhere/lib/python3.11/site-packages/spank_sif/_plugin.cpython-311-x86_64-linux-gnu.so"
    conf = slurm_setup(tmp_path, f"required {other}\n")
    failed_with(doctor.check_plugstack(conf, plugin), f"loads another spank-sif: {other}")


def test_plugstack_optional(tmp_path, plugin):
    conf = slurm_setup(tmp_path, f"optional {plugin}\n")
    failed_with(doctor.check_plugstack(conf, plugin), "'optional'", "make it 'required'")


def test_plugstack_argument_typo(tmp_path, plugin):
    conf = slurm_setup(tmp_path, f"required {plugin} confg=/etc/x.yaml\n")
    failed_with(doctor.check_plugstack(conf, plugin), "unknown argument 'confg=/etc/x.yaml'", code=CONFIG)


def test_plugstack_without_slurm_conf(tmp_path, plugin):
    failed_with(doctor.check_plugstack(str(tmp_path / "slurm.conf"), plugin), "cannot read", "SLURM_CONF")


# ---------------------------------------------------------------- site configuration


def test_site_config_valid(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("mount_point: /sif\nstate_dir: /run/x\n")
    result = doctor.check_site_config(str(path), "/run/x")
    assert result.ok, result
    assert f"{path} is valid" in result.detail


def test_site_config_typo(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("mount_piont: /sif\n")
    failed_with(doctor.check_site_config(str(path)), "unknown key 'mount_piont'", "fix the file", code=CONFIG)
    failed_with(doctor.check_site_config(str(tmp_path / "missing.yaml")), "not found", code=CONFIG)


def test_site_config_state_dir_unlike_the_plugstack_line(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("state_dir: /run/a\n")
    failed_with(doctor.check_site_config(str(path), "/run/b"), "state_dir is /run/a", "/run/b",
                "state_dir=/run/a", code=CONFIG)
    failed_with(doctor.check_site_config(str(path)), "/run/spank-sif", code=CONFIG)  # the plugin's default


# ---------------------------------------------------------------- state directory


def findmnt_type(path: Path) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True,
                          text=True, check=True).stdout.split()[-1]  # the last mount is on top


@root_only
def test_state_dir_on_tmpfs(on_tmpfs):
    assert findmnt_type(on_tmpfs) == "tmpfs"
    missing = doctor.check_state_dir(str(on_tmpfs / "state"))
    assert missing.ok and "creates it" in missing.detail, missing
    (on_tmpfs / "state").mkdir(mode=0o700)
    assert doctor.check_state_dir(str(on_tmpfs / "state")).ok


def test_filesystem_type_agrees_with_findmnt(tmp_path, on_tmpfs):
    for path in (tmp_path, on_tmpfs, Path("/"), tmp_path / "not" / "yet"):
        assert doctor.filesystem_type(str(path)) == findmnt_type(path if path.exists() else tmp_path)


def test_state_dir_not_on_tmpfs(tmp_path):
    if findmnt_type(tmp_path) == "tmpfs":
        pytest.skip(f"{tmp_path} is on a tmpfs here")
    (tmp_path / "state").mkdir(mode=0o700)
    result = doctor.check_state_dir(str(tmp_path / "state"))
    assert result.status == "warning", result  # jobs still work; records outlive a reboot
    assert "not tmpfs" in result.detail and "tmpfs" in result.fix


def test_filesystem_type_reads_escaped_mount_points(tmp_path):
    (tmp_path / "with space").mkdir()
    (tmp_path / "with").mkdir()
    mountinfo = tmp_path / "mountinfo"
    escaped = str(tmp_path / "with space").replace(" ", "\\040")
    mountinfo.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                         f"30 22 0:5 / {escaped} rw shared:2 - tmpfs tmpfs rw\n")
    assert doctor.filesystem_type(str(tmp_path / "with space" / "state"), str(mountinfo)) == "tmpfs"
    assert doctor.filesystem_type(str(tmp_path / "with"), str(mountinfo)) == "ext4"


@root_only
def test_state_dir_that_jobs_cannot_use(on_tmpfs):
    state = on_tmpfs / "state"
    state.mkdir(mode=0o700)
    os.chown(state, user_uid(), 0)
    failed_with(doctor.check_state_dir(str(state)), f"owned by uid {user_uid()}", "chown root", code=STATE)
    shutil.rmtree(state)
    state.symlink_to(on_tmpfs)
    failed_with(doctor.check_state_dir(str(state)), "symbolic link", code=STATE)
    state.unlink()
    state.write_text("")
    failed_with(doctor.check_state_dir(str(state)), "not a directory", code=STATE)
    failed_with(doctor.check_state_dir(str(state / "sub")), "cannot be created", code=STATE)


@root_only
def test_state_dir_others_can_read(on_tmpfs):
    (on_tmpfs / "state").mkdir(mode=0o755)
    result = doctor.check_state_dir(str(on_tmpfs / "state"))
    assert result.status == "warning", result  # the plugin tightens it on first use
    assert "mode 0755" in result.detail and "chmod 0700" in result.fix


# ---------------------------------------------------------------- mount point


@root_only
def test_mount_point_present_or_creatable(world):
    missing = doctor.check_mount_point(str(world / "sif"))
    assert missing.ok and "creates it" in missing.detail, missing
    (world / "sif").mkdir()
    assert doctor.check_mount_point(str(world / "sif")).ok


@root_only
def test_mount_point_problems(world):
    (world / "real").mkdir()
    (world / "link").symlink_to(world / "real")
    failed_with(doctor.check_mount_point(str(world / "link" / "sif")), "symbolic link",
                str(world / "real" / "sif"))
    (world / "file").write_text("")
    failed_with(doctor.check_mount_point(str(world / "file")), "not a directory")
    (world / "users").mkdir()
    os.chown(world / "users", user_uid(), 0)
    failed_with(doctor.check_mount_point(str(world / "users")), f"owned by uid {user_uid()}", "chown root")
    (world / "closed").mkdir(mode=0o700)
    failed_with(doctor.check_mount_point(str(world / "closed" / "sif")), "closed to other users",
                f"chmod o+x {world / 'closed'}")


# ---------------------------------------------------------------- Python, as a job's user


def libpython() -> str:
    return os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))


@root_only
def test_python_usable_by_job_users(plugin):
    result = doctor.check_python(os.path.join(PREFIX, "bin", "python3"), libpython(), plugin)
    assert result.ok, result
    assert "nobody starts it and imports spank-sif" in result.detail


@root_only
def test_python_in_a_directory_users_cannot_pass(world, plugin):
    closed = world / "venv-bin"
    closed.mkdir(mode=0o700)
    (closed / "python3").symlink_to(os.path.join(PREFIX, "bin", "python3"))
    failed_with(doctor.check_python(str(closed / "python3"), libpython(), plugin),
                f"{closed} (mode 0700) is closed to other users", "chmod -R a+rX")


@root_only
def test_libpython_users_cannot_read(world, plugin):
    copy = world / os.path.basename(libpython())
    shutil.copy(libpython(), copy)
    copy.chmod(0o600)
    failed_with(doctor.check_python(os.path.join(PREFIX, "bin", "python3"), str(copy), plugin),
                f"{copy} (mode 0600) is not readable by other users")


def test_python_that_does_not_exist(tmp_path, plugin):
    failed_with(doctor.check_python(str(tmp_path / "python3"), libpython(), plugin), "does not exist",
                "python=")


@root_only
def test_python_without_spank_sif(plugin):
    """python= naming an interpreter every user can run but that has no spank-sif."""
    failed_with(doctor.check_python("/usr/bin/python3", libpython(), plugin),
                "as nobody, /usr/bin/python3 cannot import spank-sif", "No module named 'spank_sif'")


# ---------------------------------------------------------------- exit status and the command


def test_exit_status_is_the_first_failures_code(tmp_path):
    bad_config = tmp_path / "site.yaml"
    bad_config.write_text("log_level: loud\n")
    config = doctor.check_site_config(str(bad_config))
    missing_program = doctor.check_cryptsetup_program([str(tmp_path / "none")])
    warning = doctor.as_warning(missing_program, "the library works")
    state = doctor.failed("state-dir", "x", "y", STATE)
    assert doctor.exit_status([warning]) == 0
    assert doctor.exit_status([warning, config, missing_program, state]) == CONFIG
    assert doctor.exit_status([state, config]) == STATE
    assert doctor.exit_status([missing_program, config]) == NODE


def test_help_exit_codes_match_the_cli_table():
    table = dict(re.findall(r"^\s+(\d+)\s+(.*)$", EXIT_CODES, re.M))
    assert "configuration" in table[str(CONFIG)] and "configuration" in EPILOG
    assert "node" in table[str(NODE)] and "state directory" in table[str(STATE)]
    codes = [int(c) for c in re.findall(r"^\s+(\d+)\s", EPILOG, re.M)]
    assert codes == [0, 1, CONFIG, NODE, STATE, 64]
    assert all(str(c) in table or c == 0 for c in codes)


def run_doctor(*argv, env=None, user=None):
    if not os.path.exists(SPANK_SIF):
        pytest.fail(f"{SPANK_SIF} missing: run scripts/install.sh")
    return subprocess.run([SPANK_SIF, "doctor", *argv], capture_output=True, text=True, cwd="/",
                          env=env, user=user, timeout=600, check=False)


@root_only
@no_device_mapper
def test_doctor_here_reports_the_missing_device_mapper():
    out = run_doctor()
    lines = out.stdout.splitlines()
    assert out.returncode == NODE, out.stdout + out.stderr
    assert [line.split()[1] for line in lines[:-1]] == NAMES
    assert all(re.match(r"(ok  |WARN|FAIL)  \S", line) for line in lines[:-1]), lines
    dm = lines[NAMES.index("device-mapper")]
    assert dm.startswith("FAIL  device-mapper  no device-mapper driver"), dm
    assert "; fix: load it (modprobe dm_mod" in dm
    assert lines[0].startswith("FAIL  kernel") and "dm_mod" in lines[0] and "fix: " in lines[0]
    assert "checks failed" in lines[-1] and f"exit status {NODE}" in lines[-1]
    assert out.stderr == ""


@root_only
def test_doctor_json(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("mount_piont: /sif\n")
    out = run_doctor("--json", "--config", str(config))
    report = json.loads(out.stdout)
    assert [c["name"] for c in report["checks"]] == NAMES
    assert report["exit_code"] == out.returncode and report["ok"] is (out.returncode == 0)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["config"]["status"] == "error" and "mount_piont" in checks["config"]["detail"]
    assert checks["config"]["exit_code"] == CONFIG
    assert checks["state-dir"]["status"] == "warning" and "not checked" in checks["state-dir"]["detail"]
    for check in report["checks"]:
        assert set(check) == {"name", "ok", "status", "detail", "fix", "exit_code"}
        assert check["ok"] is (check["status"] == "ok")
        assert check["ok"] or check["fix"]
    first_error = next(c for c in report["checks"] if c["status"] == "error")
    assert out.returncode == first_error["exit_code"]


@root_only
def test_doctor_checks_what_the_plugstack_line_names(tmp_path, plugin):
    """Without --config, the site configuration is the one the plugin reads (config= on its line),
    unless $SPANK_SIF_CONFIG names another; state_dir= on the line must match it."""
    typo, good = tmp_path / "typo.yaml", tmp_path / "good.yaml"
    typo.write_text("mount_piont: /sif\n")
    good.write_text("state_dir: /run/elsewhere\n")
    conf = slurm_setup(tmp_path, f"required {plugin} config={typo} python={PREFIX}/bin/python3\n")
    env = dict(os.environ, SLURM_CONF=conf)
    env.pop("SPANK_SIF_CONFIG", None)
    checks = {c["name"]: c for c in json.loads(run_doctor("--json", env=env).stdout)["checks"]}
    assert checks["plugstack"]["ok"], checks["plugstack"]
    assert checks["config"]["status"] == "error" and str(typo) in checks["config"]["detail"]
    assert checks["python"]["ok"], checks["python"]
    env["SPANK_SIF_CONFIG"] = str(good)
    checks = {c["name"]: c for c in json.loads(run_doctor("--json", env=env).stdout)["checks"]}
    assert checks["config"]["status"] == "error", checks["config"]
    assert "state_dir is /run/elsewhere" in checks["config"]["detail"]
    assert "state_dir=/run/elsewhere" in checks["config"]["fix"]


def test_doctor_needs_root():
    out = run_doctor(user="nobody")
    assert out.returncode == 64 and out.stderr.strip() == (
        "spank-sif: spank-sif doctor needs root (it checks devices and files only root can open)")


# ---------------------------------------------------------------- the VM node, with the test cluster


@pytest.mark.vm
@pytest.mark.slurm
@pytest.mark.root
def test_doctor_all_good_on_a_node_running_the_test_cluster(cluster):  # noqa: F811 - the fixture
    """Everything a job needs is there (the jobs of tests/test_vm_slurm.py prove it): doctor agrees."""
    out = run_doctor("--config", str(cluster.site_config), env=cluster.env())
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == NAMES
    assert all(line.startswith("ok    ") for line in lines[:-1]), out.stdout
    assert lines[-1] == f"all {len(NAMES)} checks passed"
    assert f"  {cluster.plugstack}:1: required " in lines[NAMES.index("plugstack")]
