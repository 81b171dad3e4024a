"""The VM harness itself: dm-crypt really works where vm tests run, and the host reports what the VM saw."""
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
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


class FakeItem:
    def __init__(self, nodeid):
        self.nodeid = nodeid


@pytest.mark.parametrize("modules, count, groups", [
    # (module, number of tests), VMs -> the modules each VM runs
    ([("tests/test_vm_kdf.py", 3), ("tests/test_vm_engine.py", 2), ("tests/test_vm_slurm.py", 2)], 2,
     [["tests/test_vm_kdf.py"], ["tests/test_vm_engine.py", "tests/test_vm_slurm.py"]]),
    ([("tests/test_vm_kdf.py", 3), ("tests/test_vm_engine.py", 2)], 1,
     [["tests/test_vm_kdf.py", "tests/test_vm_engine.py"]]),
    ([("tests/test_unknown_a.py", 5), ("tests/test_unknown_b.py", 1), ("tests/test_unknown_c.py", 4)], 2,
     [["tests/test_unknown_a.py"], ["tests/test_unknown_b.py", "tests/test_unknown_c.py"]]),
    ([("tests/test_vm_harness.py", 2)], 3, [["tests/test_vm_harness.py"], [], []]),
])
def test_vm_tests_are_shared_out_by_whole_modules(modules, count, groups, tmp_path, monkeypatch):
    """Whole modules (their fixtures are built once per VM), the costliest first into the least loaded
    VM (durations.json; unknown modules by their number of tests), collection order kept in each."""
    from vm import plugin
    from vm.plugin import split_by_module
    durations = tmp_path / "durations.json"
    durations.write_text('{"tests/test_vm_kdf.py": 700, "tests/test_vm_engine.py": 330, '
                         '"tests/test_vm_slurm.py": 370}')
    monkeypatch.setattr(plugin, "DURATIONS", durations)
    items = [FakeItem(f"{module}::test_{i}") for module, n in modules for i in range(n)]
    shards = split_by_module(items, count)
    assert [sorted({item.nodeid.split("::")[0] for item in shard}, key=[m for m, _ in modules].index)
            for shard in shards] == groups
    assert sorted((item for shard in shards for item in shard), key=items.index) == items
    for shard in shards:
        assert shard == sorted(shard, key=items.index)


@pytest.mark.parametrize("value, count", [("1", 1), ("3", 3)])
def test_the_number_of_vms_can_be_set(monkeypatch, value, count):
    from vm.plugin import vm_count
    monkeypatch.setenv("SPANK_SIF_VMS", value)
    assert vm_count(None) == count
    assert vm_count("skipped anyway") == 1


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_number_of_vms_is_a_usage_error(monkeypatch, value):
    from vm.plugin import vm_count
    monkeypatch.setenv("SPANK_SIF_VMS", value)
    with pytest.raises(pytest.UsageError, match="SPANK_SIF_VMS"):
        vm_count(None)


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

@pytest.fixture
def fails_in_teardown():
    yield
    raise RuntimeError("teardown broke inside")

@pytest.mark.vm
def test_errors_in_teardown(fails_in_teardown):
    pass

@pytest.fixture
def skips_in_setup():
    pytest.skip("inner setup skip reason")

@pytest.mark.vm
def test_skips_in_setup(skips_in_setup):
    pass

@pytest.fixture
def teardown_misbehaves(request):
    """What a fixture's teardown does in the guest, chosen by SPANK_SIF_SYNTHETIC_TEARDOWN:
    hang (a stuck mapping), exit (pytest dies, status 0, before reporting the teardown), or write a
    cut-off `failed` teardown line to results.jsonl and then hang (cut-and-hang) or go on (cut)."""
    import json, time
    yield
    action = os.environ.get("SPANK_SIF_SYNTHETIC_TEARDOWN", "")
    if action.startswith("cut"):
        line = json.dumps({"nodeid": request.node.nodeid, "when": "teardown", "outcome": "failed",
                           "text": "teardown failed", "crash": None, "xfail": None})
        with open(os.environ["SPANK_SIF_VM_RESULTS"], "a") as f:
            f.write(line[:len(line) // 2] + ("\\n" if action == "cut" else ""))
    if action in ("hang", "cut-and-hang"):
        time.sleep(600)
    if action == "exit":
        os._exit(0)

@pytest.mark.vm
def test_teardown_misbehaves(teardown_misbehaves):
    pass

def test_on_the_host():
    assert os.environ.get("SPANK_SIF_IN_VM") != "1"
'''

# The synthetic suite's conftest: the harness and strict mode, and (SPANK_SIF_SYNTHETIC_SESSION_ERROR=1)
# an error in the guest's session finish, after every test has passed.
SYNTHETIC_CONFTEST = '''
import os
import sys
sys.path.insert(0, {tests!r})
pytest_plugins = ["vm.plugin", "strict_mode"]

def pytest_sessionfinish(session):
    if os.environ.get("SPANK_SIF_IN_VM") == "1" and os.environ.get("SPANK_SIF_SYNTHETIC_SESSION_ERROR"):
        raise RuntimeError("session finish broke inside")
'''


@dataclass
class Synthetic:
    results: dict[str, tuple[str, str]]  # test name: (passed/failure/error/skipped, message and text)
    output: str  # what the outer pytest printed
    returncode: int  # the outer pytest's exit status

    def kinds(self) -> dict[str, str]:
        return {name: kind for name, (kind, _) in self.results.items()}

    def summary(self, name: str) -> str:
        """The line pytest's short test summary printed for this test (-rA): its one-line reason."""
        lines = [line for line in self.output.splitlines() if f"::{name} - " in line]
        assert len(lines) == 1, self.output
        return lines[0]


def run_synthetic(tmp_path: Path, *args: str, **env: str) -> Synthetic:
    """Run the synthetic suite (strict mode off unless asked for) and collect what the outer run reported."""
    import sys
    import xml.etree.ElementTree as ET
    suite = tmp_path / "suite"
    suite.mkdir(parents=True, exist_ok=True)
    tests_dir = Path(__file__).resolve().parent
    (suite / "conftest.py").write_text(SYNTHETIC_CONFTEST.format(tests=str(tests_dir)))
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    vm: needs dm-crypt\n")
    (suite / "test_synthetic.py").write_text(SYNTHETIC)
    xml = tmp_path / "outer.xml"
    # -rA and a wide terminal: the short summary shows each test's one-line reason in full
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--junitxml", str(xml),
                           "--basetemp", str(tmp_path / "basetemp"), *args], cwd=suite,
                          env={**os.environ, "SPANK_SIF_VM_LAUNCHER": "local", "SPANK_SIF_STRICT": "",
                               "COLUMNS": "400", **env}, capture_output=True, text=True)
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        children = [c for c in case if c.tag not in ("system-out", "system-err")]
        kind = children[-1].tag if children else "passed"  # a teardown error follows the call's result
        results[case.get("name")] = (kind, "\n".join(f"{c.get('message')}\n{c.text}" for c in children))
    return Synthetic(results, proc.stdout + proc.stderr, proc.returncode)


def test_each_vm_test_reports_what_the_guest_saw(tmp_path):
    run = run_synthetic(tmp_path, SPANK_SIF_VM="force")
    assert run.output.count("spank-sif: running 12 vm test(s)") == 1, run.output  # one guest run for all
    results = run.results
    assert run.kinds() == {
        "test_passes": "passed", "test_fails": "failure", "test_skips": "skipped", "test_xfails": "skipped",
        "test_errors_in_setup": "failure", "test_skipif_is_evaluated_inside": "passed",
        "test_parametrized[1]": "passed", "test_parametrized[2]": "failure", "test_sleeps": "passed",
        "test_errors_in_teardown": "failure", "test_skips_in_setup": "skipped",
        "test_teardown_misbehaves": "passed", "test_on_the_host": "passed"}, run.output
    assert run.returncode == 1
    # the message (pytest's one-line summary) is the inner cause; the text has the inner traceback
    assert results["test_fails"][1].startswith("failed inside the VM: AssertionError: inner failure text")
    assert 'assert 6 * 7 == 43, "inner failure text"' in results["test_fails"][1]
    assert "inner skip reason" in results["test_skips"][1]
    assert "inner xfail reason" in results["test_xfails"][1]
    assert "error in setup inside the VM: RuntimeError: fixture broke inside" in results["test_errors_in_setup"][1]
    assert "fixture broke inside" in results["test_errors_in_setup"][1]
    # a passed call does not make a pass when the teardown failed; a skip in setup is a skip
    assert run.summary("test_errors_in_teardown").endswith(
        "test_errors_in_teardown - error in teardown inside the VM: RuntimeError: teardown broke inside")
    assert "inner setup skip reason" in results["test_skips_in_setup"][1]


def test_deselected_vm_tests_start_nothing(tmp_path):
    run = run_synthetic(tmp_path, "-m", "not vm", SPANK_SIF_VM="force")
    assert set(run.results) == {"test_on_the_host"} and "spank-sif: running" not in run.output, run.output


def test_vm_tests_can_be_switched_off(tmp_path):
    run = run_synthetic(tmp_path, "-k", "passes or on_the_host", SPANK_SIF_VM="off")
    assert run.results["test_on_the_host"][0] == "passed" and "spank-sif: running" not in run.output, run.output
    kind, message = run.results["test_passes"]
    if dmcrypt_missing() is None:  # off changes nothing where dm-crypt works: the test ran here, not in a VM
        assert kind == "failure" and "SPANK_SIF_IN_VM" in message, run.output
    else:
        assert kind == "skipped" and "SPANK_SIF_VM=off" in message, run.output


def test_a_vm_run_that_gives_no_result_fails_with_its_output(tmp_path):
    run = run_synthetic(tmp_path, "-k", "sleeps or passes", SPANK_SIF_VM="force",
                        SPANK_SIF_VM_TIMEOUT="15", SPANK_SIF_SYNTHETIC_SLEEP="600")
    kind, message = run.results["test_sleeps"]
    assert kind == "failure" and "test_synthetic.py" in message, run.output  # with the end of the output
    assert run.summary("test_sleeps").endswith(
        "test_sleeps - no complete result from the VM (it recorded: setup passed): the VM run timed out "
        "after 15 s (SPANK_SIF_VM_TIMEOUT); run directory " + str(tmp_path / "basetemp" / "vm0")), run.output
    assert run.results["test_passes"][0] == "passed"  # results the guest wrote before the timeout still count


def test_a_vm_that_cannot_start_fails_every_vm_test(tmp_path):
    run = run_synthetic(tmp_path, "-k", "passes or on_the_host", SPANK_SIF_VM="force",
                        SPANK_SIF_VM_LAUNCHER="vng", SPANK_SIF_VM_KERNEL=str(tmp_path / "no-kernel"))
    assert run.results["test_on_the_host"][0] == "passed", run.output
    kind, message = run.results["test_passes"]
    assert kind == "failure" and "cannot start the VM" in message and "no-kernel" in message


# A guest run that goes wrong while or after its tests pass: each turns the affected host tests red
# with a one-line reason (the short test summary line), and the host run exits non-zero.

def test_a_run_that_times_out_in_a_fixture_teardown_fails_that_test(tmp_path):
    run = run_synthetic(tmp_path, "-k", "passes or teardown_misbehaves", SPANK_SIF_VM="force",
                        SPANK_SIF_VM_TIMEOUT="15", SPANK_SIF_SYNTHETIC_TEARDOWN="hang")
    assert run.kinds() == {"test_passes": "passed", "test_teardown_misbehaves": "failure"}, run.output
    assert run.summary("test_teardown_misbehaves").endswith(
        "test_teardown_misbehaves - no complete result from the VM (it recorded: setup passed, call passed): "
        "the VM run timed out after 15 s (SPANK_SIF_VM_TIMEOUT); run directory "
        + str(tmp_path / "basetemp" / "vm0")), run.output
    assert run.returncode == 1


def test_a_guest_that_exits_non_zero_after_every_test_passed_fails_the_run(tmp_path):
    run = run_synthetic(tmp_path, "-k", "passes or skipif_is", SPANK_SIF_VM="force",
                        SPANK_SIF_SYNTHETIC_SESSION_ERROR="1")
    assert run.returncode == 1, run.output
    # both calls passed; the last proxy's teardown carries the run's failure
    assert run.kinds() == {"test_passes": "passed", "test_skipif_is_evaluated_inside": "error"}, run.output
    line = run.summary("test_skipif_is_evaluated_inside")
    assert re.fullmatch(
        r"ERROR test_synthetic.py::test_skipif_is_evaluated_inside - the VM run failed outside the vm tests, after "
        r"each had a complete result: the inner pytest exited with status [1-9]\d*; run directory "
        + re.escape(str(tmp_path / "basetemp" / "vm0")), line), run.output
    assert "session finish broke inside" in run.results["test_skipif_is_evaluated_inside"][1]  # the guest's output


def test_a_test_whose_teardown_was_never_reported_fails(tmp_path):
    run = run_synthetic(tmp_path, "-k", "passes or teardown_misbehaves", SPANK_SIF_VM="force",
                        SPANK_SIF_SYNTHETIC_TEARDOWN="exit")
    assert run.kinds() == {"test_passes": "passed", "test_teardown_misbehaves": "failure"}, run.output
    assert run.summary("test_teardown_misbehaves").endswith(
        "test_teardown_misbehaves - no complete result from the VM (it recorded: setup passed, call passed): "
        "the inner pytest exited with status 0; run directory " + str(tmp_path / "basetemp" / "vm0")), run.output
    assert run.returncode == 1


def test_a_cut_off_last_line_of_a_timed_out_run_fails_its_test(tmp_path):
    run = run_synthetic(tmp_path, "-k", "passes or teardown_misbehaves", SPANK_SIF_VM="force",
                        SPANK_SIF_VM_TIMEOUT="15", SPANK_SIF_SYNTHETIC_TEARDOWN="cut-and-hang")
    assert run.kinds() == {"test_passes": "passed", "test_teardown_misbehaves": "failure"}, run.output
    assert run.summary("test_teardown_misbehaves").endswith(
        "test_teardown_misbehaves - no complete result from the VM (it recorded: setup passed, call passed, "
        "then a line cut off when the VM was stopped): the VM run timed out after 15 s (SPANK_SIF_VM_TIMEOUT); "
        "run directory " + str(tmp_path / "basetemp" / "vm0")), run.output
    assert run.returncode == 1


def test_a_cut_off_line_anywhere_else_fails_every_vm_test_of_the_run(tmp_path):
    run = run_synthetic(tmp_path, "-k", "passes or teardown_misbehaves or on_the_host", SPANK_SIF_VM="force",
                        SPANK_SIF_SYNTHETIC_TEARDOWN="cut")
    assert run.kinds() == {"test_passes": "failure", "test_teardown_misbehaves": "failure",
                           "test_on_the_host": "passed"}, run.output
    for name in ("test_passes", "test_teardown_misbehaves"):
        assert re.search(rf"::{name} - line 6 of 7 of the VM's results.jsonl is unreadable, so no result of this "
                         r"VM run can be trusted \(the inner pytest exited with status 0\): '\{\"nodeid\": ",
                         run.summary(name)), run.output
    assert run.returncode == 1


def test_strict_mode_fails_every_test_that_did_not_run(tmp_path):
    run = run_synthetic(tmp_path, "-k", "skips or xfails or passes", SPANK_SIF_VM="force", SPANK_SIF_STRICT="1")
    assert run.kinds() == {"test_passes": "passed", "test_skips": "failure", "test_xfails": "failure",
                           "test_skips_in_setup": "failure"}, run.output
    assert "inner skip reason" in run.summary("test_skips") and "strict mode" in run.summary("test_skips")
    assert "xfailed in strict mode" in run.summary("test_xfails") and "inner xfail reason" in run.summary("test_xfails")
    assert "inner setup skip reason" in run.summary("test_skips_in_setup")
    off = run_synthetic(tmp_path / "off", "-k", "passes", SPANK_SIF_VM="off", SPANK_SIF_STRICT="1")
    if dmcrypt_missing() is not None:  # here SPANK_SIF_VM=off would skip the vm tests: in strict mode it fails them
        assert off.kinds() == {"test_passes": "failure"} and "SPANK_SIF_VM=off" in off.summary("test_passes")
    assert off.returncode == 1


# The rules behind those verdicts, on report lines written here (cheaper than a nested run per rule).

def report_line(nodeid: str, when: str, outcome: str = "passed", xfail: str | None = None) -> str:
    import json
    return json.dumps({"nodeid": nodeid, "when": when, "outcome": outcome, "text": f"{when} text",
                       "crash": None, "xfail": xfail})


def whole(nodeid: str, call: str | None = "passed", teardown: str = "passed") -> list[str]:
    setup = report_line(nodeid, "setup", "passed" if call else "skipped")
    return [setup, *([report_line(nodeid, "call", call)] if call else []), report_line(nodeid, "teardown", teardown)]


def judged(lines: list[str], returncode: int | None = 0, timed_out: bool = False):
    from vm.plugin import GuestEnd, judge
    outcomes, run_failure = judge(["a", "b"], lines, GuestEnd(returncode, timed_out, "how it ended"))
    return {nodeid: o.kind + ("" if o.complete else " (incomplete)") for nodeid, o in outcomes.items()}, run_failure


def test_a_pass_needs_setup_call_and_teardown_passed():
    assert judged(whole("a") + whole("b")) == ({"a": "passed", "b": "passed"}, None)
    assert judged(whole("a") + whole("b", teardown="failed"), returncode=1) == ({"a": "passed", "b": "failed"}, None)
    assert judged(whole("a") + whole("b")[:2]) == ({"a": "passed", "b": "failed (incomplete)"}, None)
    assert judged(whole("a") + whole("b")[:1] + whole("b")[2:]) == ({"a": "passed", "b": "failed (incomplete)"}, None)
    assert judged(whole("a", call=None) + whole("b", call=None)) == ({"a": "skipped", "b": "skipped"}, None)


def test_a_failed_run_fails_the_tests_without_a_complete_result_or_else_the_run():
    assert judged(whole("a") + whole("b")[:2], returncode=None, timed_out=True) == (
        {"a": "passed", "b": "failed (incomplete)"}, None)
    assert judged(whole("a", call=None) + whole("b")[:1], returncode=None, timed_out=True) == (
        {"a": "skipped", "b": "failed (incomplete)"}, None)
    assert judged(whole("a", call="failed") + whole("b"), returncode=1) == ({"a": "failed", "b": "passed"}, None)
    for returncode, timed_out in ((1, False), (3, False), (None, False), (None, True), (-9, False)):
        outcomes, run_failure = judged(whole("a") + whole("b"), returncode, timed_out)
        assert outcomes == {"a": "passed", "b": "passed"} and run_failure.endswith(": how it ended")
    assert judged(whole("a", call="failed") + whole("b"), returncode=3)[1].endswith(": how it ended")


def test_only_the_cut_off_last_line_of_a_timed_out_run_is_tolerated():
    cut = whole("b")[2][:30]
    assert judged(whole("a") + whole("b")[:2] + [cut], returncode=None, timed_out=True) == (
        {"a": "passed", "b": "failed (incomplete)"}, None)
    assert judged(whole("a") + whole("b")[:2] + ['{"nod'], returncode=None, timed_out=True) == (
        {"a": "passed", "b": "failed (incomplete)"}, None)
    everything_fails = ({"a": "failed (incomplete)", "b": "failed (incomplete)"}, None)
    assert judged(whole("a") + whole("b")[:2] + [cut], returncode=None) == everything_fails  # a crash, no timeout
    assert judged(whole("a") + whole("b") + [cut], returncode=0) == everything_fails
    assert judged(whole("a") + [cut] + whole("b"), returncode=None, timed_out=True) == everything_fails
    assert judged(whole("a") + ['{"nodeid": "b"}'] + whole("b")) == everything_fails  # whole but not a report
    assert judged(whole("a") + [""] + whole("b")) == everything_fails
    damaged = whole("b")[0].replace("setup text", "set\ufffdup text")  # valid JSON, but not what was written
    assert judged(whole("a") + [damaged] + whole("b")[1:]) == everything_fails


def test_strict_mode_also_fails_skipped_modules_and_xpasses(tmp_path):
    import sys
    tests_dir = Path(__file__).resolve().parent
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(tests_dir)!r})\n"
                                          "pytest_plugins = ['strict_mode']\n")
    (tmp_path / "test_module_skip.py").write_text(
        "import pytest\npytest.skip('module skip reason', allow_module_level=True)\n")
    (tmp_path / "test_xpass.py").write_text(
        "import pytest\n@pytest.mark.xfail(reason='xpass reason')\ndef test_xpasses():\n    pass\n")
    def pytest(strict: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                               "--continue-on-collection-errors"], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "400", "SPANK_SIF_STRICT": strict}, check=False)
    lenient = pytest("")
    assert lenient.returncode == 0 and "1 skipped, 1 xpassed" in lenient.stdout, lenient.stdout
    strict = pytest("1")
    assert strict.returncode == 1 and "1 failed, 1 error" in strict.stdout, strict.stdout
    assert ("ERROR test_module_skip.py - skipped at collection in strict mode (SPANK_SIF_STRICT=1), where every "
            "test must run: module skip reason") in strict.stdout
    assert "FAILED test_xpass.py::test_xpasses - xpassed in strict mode" in strict.stdout
