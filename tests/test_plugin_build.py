"""The installed plugin: one shared object that is both a Slurm plugin and a Python module.

Checked on the artifact `pip install .` produced in the plugin's environment ($SPANK_SIF_PREFIX,
default /opt/spank-sif), the one the Slurm tests load.
"""
import os
import re
import subprocess

import pytest

from slurm import PREFIX
PYTHON = os.path.join(PREFIX, "bin", "python3")


def installed(*argv) -> str:
    if not os.path.exists(PYTHON):
        pytest.fail(f"{PYTHON} missing: run scripts/install.sh")
    return subprocess.run([PYTHON, *argv], capture_output=True, text=True, check=True, cwd="/").stdout


@pytest.fixture(scope="module")
def plugin():
    return installed("-m", "spank_sif", "plugin-path").strip()


def test_plugin_path_is_the_extension_inside_the_package(plugin):
    assert os.path.isabs(plugin) and os.path.isfile(plugin)
    assert re.search(r"/site-packages/spank_sif/_plugin\.cpython-3\d+-[^/]*\.so$", plugin), plugin


def test_plugstack_line(plugin):
    line = installed("-m", "spank_sif", "plugstack-line", "--config", "/etc/slurm/x.yaml").split()
    assert line == ["required", plugin, f"python={PREFIX}/bin/python3", "config=/etc/slurm/x.yaml"]
    bad = subprocess.run([PYTHON, "-m", "spank_sif", "plugstack-line", "--config", "rel.yaml"],
                         capture_output=True, text=True, cwd="/")
    assert bad.returncode != 0 and "absolute" in bad.stderr


def dynamic(plugin) -> str:
    return subprocess.run(["readelf", "-d", "--dyn-syms", "-W", plugin], capture_output=True,
                          text=True, check=True).stdout


def test_links_its_own_libpython_with_rpath(plugin):
    text = dynamic(plugin)
    assert re.search(r"\(NEEDED\).*\[libpython3\.\d+\.so\.1\.0\]", text)
    assert "(RPATH)" in text and "(RUNPATH)" not in text   # RPATH beats the user's LD_LIBRARY_PATH


def exported(plugin) -> set:
    out = subprocess.run(["nm", "-D", "--defined-only", plugin], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines()}


# What Slurm's loader looks up (the callbacks the shim has, the plugin_* data) and what Python's
# importer looks up: nothing else. Slurm calls an exported init()/fini(), slurmd runs `spank prolog`
# for a job_prolog; the shim's own functions are called by cffi's code inside the object.
EXPORTS = {"plugin_name", "plugin_type", "plugin_version", "spank_plugin_version",
           "slurm_spank_init", "slurm_spank_init_post_opt", "slurm_spank_user_init",
           "slurm_spank_task_init_privileged", "slurm_spank_task_init", "slurm_spank_exit",
           "slurm_spank_job_epilog",
           "PyInit__plugin"}


def test_exports_what_slurm_and_python_look_up_and_nothing_else(plugin):
    assert exported(plugin) == EXPORTS


def test_built_hardened(plugin):
    """Loaded into every slurmstepd as root: full RELRO (the GOT is read-only, every symbol bound
    at load), a stack protector, fortified libc calls."""
    assert_hardened(plugin)


def test_hardened_even_where_the_toolchain_is_not(tmp_path):
    """Debian's compiler and linker already add a stack protector and RELRO, so the installed object
    cannot show that the build asks for them itself. Built here with a toolchain whose defaults
    (and the site's CFLAGS/LDFLAGS) turn them off, it still has them."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([PYTHON, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                    "--build-temp", str(tmp_path / "temp")], cwd=repo, check=True, capture_output=True,
                   env=dict(os.environ, CFLAGS="-fno-stack-protector -U_FORTIFY_SOURCE",
                            LDFLAGS="-Wl,-z,norelro -Wl,-z,lazy"))
    (built,) = (tmp_path / "lib" / "spank_sif").glob("_plugin*.so")
    assert_hardened(built)


def assert_hardened(plugin):
    dynamic_section = subprocess.run(["readelf", "-d", "-W", plugin], capture_output=True, text=True,
                                     check=True).stdout
    assert "(BIND_NOW)" in dynamic_section and re.search(r"\(FLAGS_1\).*\bNOW\b", dynamic_section)
    headers = subprocess.run(["readelf", "-l", "-W", plugin], capture_output=True, text=True,
                             check=True).stdout
    assert "GNU_RELRO" in headers
    imported = subprocess.run(["nm", "-D", "--undefined-only", plugin], capture_output=True, text=True,
                              check=True).stdout
    assert "__stack_chk_fail" in imported
    assert {"__snprintf_chk", "__fprintf_chk", "__realpath_chk"} <= {
        line.split()[-1].split("@")[0] for line in imported.splitlines()}


def test_built_for_the_installed_slurm_headers():
    header = open("/usr/include/slurm/slurm_version.h").read()
    number = int(re.search(r"#define SLURM_VERSION_NUMBER (0x[0-9a-fA-F]+)", header).group(1), 16)
    got = installed("-c", "from spank_sif._plugin import lib; print(lib.shim_slurm_version())")
    assert int(got) == number


def test_imports_in_plain_python_with_weak_spank_symbols():
    """Outside Slurm every host symbol is NULL: the module loads and the wrappers say so."""
    code = """
from spank_sif import spank
from spank_sif._plugin import lib
print(spank.context(), spank.option_value())
try:
    spank.getenv(spank._ffi().NULL, "X")
except spank.SpankCallError as err:
    print("refused:", err)
"""
    lines = installed("-c", code).splitlines()
    assert lines[0] == "error None"
    assert lines[1].startswith("refused: spank_getenv(X) failed (SPANK error 3009)")


def test_a_build_directory_never_hands_back_a_plugin_for_another_environment(tmp_path):
    """Building from one checkout for two environments (an upgrade into a new prefix, a test
    prefix) reuses the build directory; the second plugin must name its own interpreter."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for python in ("/opt/first/bin/python3", "/opt/second/bin/python3"):
        subprocess.run([PYTHON, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                        "--build-temp", str(tmp_path / "temp")], cwd=repo, check=True, capture_output=True,
                       env=dict(os.environ, SPANK_SIF_PYTHON=python))
        (built,) = (tmp_path / "lib" / "spank_sif").glob("_plugin*.so")
        code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location("
                "'spank_sif._plugin', sys.argv[1]); m = importlib.util.module_from_spec(spec); "
                "spec.loader.exec_module(m); print(m.ffi.string(m.lib.shim_python()).decode())")
        assert installed("-c", code, str(built)).strip() == python
        # An *earlier* build (distutils compares whole seconds): age its outputs by a minute.
        for output in tmp_path.rglob("*"):
            os.utime(output, (output.stat().st_atime, output.stat().st_mtime - 60))
