"""The VM harness itself: dm-crypt really works where vm tests run, and the host reports what the VM saw."""
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from vm.capability import dm_targets, dmcrypt_missing, in_vm


def sh(*argv) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.vm
def test_dm_crypt_opens_a_reference_image_and_the_mount_shows_its_files(ref_images, tmp_path):
    assert dmcrypt_missing() is None and Path("/dev/mapper/control").exists()
    image = ref_images.fast_pass_4k
    data = image.read_bytes()
    offset = data.find(b"LUKS\xba\xbe")  # the partition starts with the LUKS2 header (4 KiB aligned)
    assert offset > 0 and offset % 4096 == 0
    loop = sh("losetup", "--read-only", "--find", "--show", "--offset", offset, image)
    name = f"harness-{os.getpid()}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh("cryptsetup", "open", "--readonly", "--type", "luks2", "--key-file", ref_images.pass_file, loop, name)
        try:
            sh("mount", "-t", "squashfs", "-o", "ro", f"/dev/mapper/{name}", mnt)
            try:
                assert (mnt / "hello.txt").read_bytes() == ref_images.hello
                blob = (mnt / ref_images.blob_path).read_bytes()
                assert hashlib.sha256(blob).hexdigest() == ref_images.blob_sha256
            finally:
                sh("umount", mnt)
        finally:
            sh("cryptsetup", "close", name)
    finally:
        sh("losetup", "-d", loop)


def can_map_a_luks_volume(tmp_path: Path) -> bool:
    """The oracle for capability detection: does the real cryptsetup manage to map a volume here?"""
    import reftools
    volume = reftools.luks_format(tmp_path / "probe.luks", b"probe key", 20 * 1024 * 1024)
    keyfile = tmp_path / "probe.key"
    keyfile.write_bytes(b"probe key")
    name = f"harness-probe-{os.getpid()}"
    opened = subprocess.run(["cryptsetup", "open", "--type", "luks2", "--key-file", str(keyfile), str(volume), name],
                            capture_output=True).returncode == 0
    if opened:
        subprocess.run(["cryptsetup", "close", name], check=True)
    return opened


def test_capability_detection_agrees_with_cryptsetup_on_this_machine(tmp_path):
    assert (dmcrypt_missing() is None) == can_map_a_luks_volume(tmp_path)


@pytest.mark.vm
def test_capability_detection_agrees_with_cryptsetup_in_the_vm(tmp_path):
    assert in_vm() or dmcrypt_missing() is None
    assert "crypt" in dm_targets()
    assert (dmcrypt_missing() is None) == can_map_a_luks_volume(tmp_path)


@pytest.mark.parametrize("mode, inside_vm, missing, plan", [
    ("auto", False, "the kernel has no device-mapper", "proxy"),
    ("auto", False, None, "native"),
    ("auto", True, None, "native"),
    ("off", False, "the kernel has no device-mapper", "skip"),
    ("off", False, None, "native"),
    ("force", False, None, "proxy"),
    ("force", False, "the kernel has no device-mapper", "proxy"),
    ("force", True, None, "native"),
])
def test_where_vm_tests_run(mode, inside_vm, missing, plan):
    from vm.plugin import vm_plan
    assert vm_plan(mode, inside_vm, missing) == plan


# A synthetic suite run by a nested pytest. SPANK_SIF_VM_LAUNCHER=local runs the guest step on this
# machine instead of in a VM: everything but the boot (proven by the vm tests above) is exercised.
SYNTHETIC = '''
import os
import pytest

@pytest.mark.vm
def test_passes():
    assert os.environ["SPANK_SIF_IN_VM"] == "1"

@pytest.mark.vm
def test_fails():
    assert 6 * 7 == 43, "inner failure text"

@pytest.mark.vm
def test_skips():
    pytest.skip("inner skip reason")

@pytest.mark.vm
@pytest.mark.xfail(reason="inner xfail reason")
def test_xfails():
    assert False

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke inside")

@pytest.mark.vm
def test_errors_in_setup(broken):
    pass

@pytest.mark.vm
@pytest.mark.skipif(os.environ.get("SPANK_SIF_IN_VM") != "1", reason="evaluated on the host")
def test_skipif_is_evaluated_inside():
    pass

@pytest.mark.vm
@pytest.mark.parametrize("n", [1, 2])
def test_parametrized(n):
    assert n == 1

@pytest.mark.vm
def test_sleeps():
    import time
    time.sleep(float(os.environ.get("SPANK_SIF_SYNTHETIC_SLEEP", "0")))

def test_on_the_host():
    assert os.environ.get("SPANK_SIF_IN_VM") != "1"
'''


def run_synthetic(tmp_path: Path, *args: str, **env: str) -> tuple[dict[str, tuple[str, str]], str]:
    """Run the synthetic suite; return {test name: (outcome, message)} from its JUnit XML, and its output."""
    import sys
    import xml.etree.ElementTree as ET
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    tests_dir = Path(__file__).resolve().parent
    (suite / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(tests_dir)!r})\n"
                                       "pytest_plugins = ['vm.plugin']\n")
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    vm: needs dm-crypt\n")
    (suite / "test_synthetic.py").write_text(SYNTHETIC)
    xml = tmp_path / "outer.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--junitxml", str(xml),
                           "--basetemp", str(tmp_path / "basetemp"), *args], cwd=suite,
                          env={**os.environ, "SPANK_SIF_VM_LAUNCHER": "local", **env}, capture_output=True, text=True)
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        child = next(iter(case), None)
        kind = "passed" if child is None or child.tag in ("system-out", "system-err") else child.tag
        results[case.get("name")] = (kind, "" if kind == "passed" else f"{child.get('message')}\n{child.text}")
    return results, proc.stdout + proc.stderr


def test_each_vm_test_reports_what_the_guest_saw(tmp_path):
    results, output = run_synthetic(tmp_path, SPANK_SIF_VM="force")
    assert output.count("spank-sif: running 9 vm test(s)") == 1, output  # one guest run for all of them
    kinds = {name: kind for name, (kind, _) in results.items()}
    assert kinds == {
        "test_passes": "passed", "test_fails": "failure", "test_skips": "skipped", "test_xfails": "skipped",
        "test_errors_in_setup": "failure", "test_skipif_is_evaluated_inside": "passed",
        "test_parametrized[1]": "passed", "test_parametrized[2]": "failure", "test_sleeps": "passed",
        "test_on_the_host": "passed"}, output
    # the message (pytest's one-line summary) is the inner cause; the text has the inner traceback
    assert results["test_fails"][1].startswith("failed inside the VM: AssertionError: inner failure text")
    assert 'assert 6 * 7 == 43, "inner failure text"' in results["test_fails"][1]
    assert "inner skip reason" in results["test_skips"][1]
    assert "inner xfail reason" in results["test_xfails"][1]
    assert "error in setup inside the VM: RuntimeError: fixture broke inside" in results["test_errors_in_setup"][1]
    assert "fixture broke inside" in results["test_errors_in_setup"][1]


def test_deselected_vm_tests_start_nothing(tmp_path):
    results, output = run_synthetic(tmp_path, "-m", "not vm", SPANK_SIF_VM="force")
    assert set(results) == {"test_on_the_host"} and "spank-sif: running" not in output, output


def test_vm_tests_can_be_switched_off(tmp_path):
    if dmcrypt_missing() is None:
        pytest.skip("this machine has dm-crypt: vm tests run natively whatever SPANK_SIF_VM says")
    results, output = run_synthetic(tmp_path, "-k", "passes or on_the_host", SPANK_SIF_VM="off")
    assert results["test_on_the_host"][0] == "passed" and "spank-sif: running" not in output, output
    assert results["test_passes"][0] == "skipped" and "SPANK_SIF_VM=off" in results["test_passes"][1]


def test_a_vm_run_that_gives_no_result_fails_with_its_output(tmp_path):
    results, output = run_synthetic(tmp_path, "-k", "sleeps or passes", SPANK_SIF_VM="force",
                                    SPANK_SIF_VM_TIMEOUT="10", SPANK_SIF_SYNTHETIC_SLEEP="120")
    kind, message = results["test_sleeps"]
    assert kind == "failure" and "timed out after 10 s" in message and "test_synthetic.py" in message, output
    assert results["test_passes"][0] == "passed"  # results the guest wrote before the timeout still count


def test_a_vm_that_cannot_start_fails_every_vm_test(tmp_path):
    results, output = run_synthetic(tmp_path, "-k", "passes or on_the_host", SPANK_SIF_VM="force",
                                    SPANK_SIF_VM_LAUNCHER="vng", SPANK_SIF_VM_KERNEL=str(tmp_path / "no-kernel"))
    assert results["test_on_the_host"][0] == "passed", output
    kind, message = results["test_passes"]
    assert kind == "failure" and "cannot start the VM" in message and "no-kernel" in message
