"""What each path of the package imports. Every job step imports the plugin's modules afresh (in
srun and in slurmstepd) and every command pays its imports at start-up, so the code defers heavy
or rarely needed modules to where they are used; these tests hold it to that, in a fresh
interpreter each (the benchmarks in bench/ say what each import costs)."""
import json
import subprocess
import sys
import textwrap

import pytest


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = textwrap.dedent(code) + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def assert_none_of(loaded: set[str], forbidden: list[str]) -> None:
    found = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not found, f"imported: {found}"


NODE_ENGINE = ["spank_sif.lifecycle", "spank_sif.dmcrypt", "spank_sif.loop", "spank_sif.mounts",
               "spank_sif.userfiles", "spank_sif.state", "spank_sif.config"]


def test_the_plugin_start_imports_no_node_engine_and_nothing_heavy():
    """What the shim's init code imports in every srun, sbatch and slurmstepd that has an image."""
    loaded = modules_after("import spank_sif.callbacks")
    assert_none_of(loaded, NODE_ENGINE + ["yaml", "cryptography", "traceback", "dataclasses",
                                          "secrets", "uuid", "datetime", "logging"])


def test_the_submit_side_of_container_mode_imports_nothing_more():
    """srun --sif-container --sif-binds=...: the options are parsed with what the start imported."""
    start = modules_after("import spank_sif.callbacks")
    loaded = modules_after("""
        import spank_sif.callbacks
        from spank_sif import options
        options.submit_side_container({"sif-container": "", "sif-binds": "a:/b:ro", "sif-workdir": "/w"},
                                      {}, "/home/u")
    """)
    assert loaded == start
    assert_none_of(loaded, ["typing"])


def test_the_node_engine_imports_neither_dataclasses_nor_traceback_nor_secrets():
    loaded = modules_after("import spank_sif.callbacks as c\nc.import_node_modules()")
    assert "spank_sif.lifecycle" in loaded
    assert_none_of(loaded, ["dataclasses", "traceback", "secrets", "uuid", "datetime", "logging",
                            "yaml", "cryptography.hazmat.primitives.asymmetric"])


def test_defaults_without_a_config_file_never_import_yaml(tmp_path):
    loaded = modules_after("from spank_sif import config\nconfig.load_config(None)")
    assert_none_of(loaded, ["yaml"])
    loaded = modules_after("from spank_sif import config\nconfig.parse_config('mount_point: /x')")
    assert "yaml" in loaded  # the control: parsing a file does import it


def test_reading_a_sif_imports_neither_uuid_nor_datetime(tmp_path):
    from spank_sif import sif
    image = tmp_path / "x.sif"
    sif.write_sif(str(image), sif.apptainer_layout(b"\0" * 4096, sif.FsType.SQUASHFS))
    loaded = modules_after(f"""
        import os
        from spank_sif import sif
        fd = os.open({str(image)!r}, os.O_RDONLY)
        sif.read_sif(fd).primary_partition()
    """)
    assert_none_of(loaded, ["uuid", "datetime", "cryptography"])


@pytest.mark.parametrize("command, forbidden", [
    ("inspect", ["spank_sif.keys", "spank_sif.luks2", "spank_sif.lifecycle", "cryptography"]),
    ("verify-key", ["spank_sif.lifecycle", "spank_sif.dmcrypt", "spank_sif.cli.inspect"]),
    ("list", ["spank_sif.cli.keys", "cryptography.hazmat.primitives.asymmetric"]),
])
def test_a_command_imports_only_its_own_module(command, forbidden):
    loaded = modules_after(f"from spank_sif import cli\ncli.build_parser({command!r})")
    assert_none_of(loaded, forbidden)


def test_a_passphrase_never_imports_rsa_key_loading():
    loaded = modules_after("""
        from spank_sif import keys
        keys.find_key_source({"APPTAINER_ENCRYPTION_PASSPHRASE": "x"})
    """)
    assert_none_of(loaded, ["cryptography"])


def test_the_submit_check_imports_nothing_of_the_node_engine_s_kernel_side():
    """srun/sbatch/salloc with an image import the check; without one the shim starts no Python
    (test_slurm_plugin's zero-cost test)."""
    loaded = modules_after("import spank_sif.callbacks, spank_sif.submit")
    assert_none_of(loaded, ["spank_sif.lifecycle", "spank_sif.dmcrypt", "spank_sif.loop",
                            "spank_sif.mounts", "spank_sif.state", "yaml", "cryptography",
                            "traceback", "dataclasses"])
