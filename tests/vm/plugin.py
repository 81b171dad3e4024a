"""pytest side of the VM harness.

On a machine without dm-crypt, every selected ``@pytest.mark.vm`` test is replaced at collection time by
a proxy with the same node id, and the proxies go after the host tests. Before the first test, the vm
tests are shared out by module among a few VMs (``SPANK_SIF_VMS``), each booted in a background thread,
running its share with the same Python (``pytest <node ids>``) while the host tests run; each guest
appends one JSON line per report (setup, call, teardown) to its results.jsonl, and each proxy then
reports what the VM saw: passed (setup, call and teardown passed), failed (with the inner report),
skipped or xfailed (with the reason), or failed with a one-line reason and the end of the VM's output
when the VM gave no complete result for it (timeout, crash, an exit before its teardown was recorded) or
when results.jsonl cannot be trusted. A guest run that fails outside the tests (an error in a session
hook) fails the teardown of the last proxy. Inside the VM, or on a machine with dm-crypt, vm tests run
as they are.

Environment: ``SPANK_SIF_VM`` = ``auto`` (default) | ``off`` (skip vm tests unless this machine has
dm-crypt; failures in strict mode) | ``force`` (use the VM even if this machine has dm-crypt);
``SPANK_SIF_VM_TIMEOUT`` (seconds for the whole VM run, default 3600). See docs/testing.md.
"""
import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import fixtures
from .capability import dmcrypt_missing, in_vm
from .harness import DEFAULT_TIMEOUT, MEMORY, VmUnavailable, run_in_vm

VM_MEMORY_GIB = int(MEMORY.removesuffix("G"))

MODE_VARIABLE = "SPANK_SIF_VM"
TIMEOUT_VARIABLE = "SPANK_SIF_VM_TIMEOUT"
RESULTS_VARIABLE = "SPANK_SIF_VM_RESULTS"  # set by the host for the pytest run inside the VM
MODES = ("auto", "off", "force")
# Python start-up is slow under emulation (imports over 9p): importing pytest takes ~30 s in the guest,
# the autoloaded hypothesis and pytest-benchmark plugins ~70 s more. The inner run loads only the
# plugins the tests name (``pytest_plugins`` in conftest.py, ``-p``); hypothesis works without its plugin.
INNER_ENVIRONMENT = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
RUNNERS_KEY = pytest.StashKey[list]()
VMS_VARIABLE = "SPANK_SIF_VMS"
DURATIONS = Path(__file__).resolve().parent / "durations.json"
DEFAULT_TEST_SECONDS = 20
MAX_VMS = 4


def vm_plan(mode: str, inside_vm: bool, missing: str | None) -> str:
    """How vm tests run here: "native" (as they are), "proxy" (in one VM) or "skip"."""
    if inside_vm:
        return "native"
    if mode == "force":
        return "proxy"
    if missing is None:
        return "native"
    return "skip" if mode == "off" else "proxy"


def vm_mode() -> str:
    mode = os.environ.get(MODE_VARIABLE, "auto") or "auto"
    if mode not in MODES:
        raise pytest.UsageError(f"{MODE_VARIABLE}={mode!r}: use one of {', '.join(MODES)}")
    return mode


# ---------------------------------------------------------------------------------------------- host side

@pytest.hookimpl(trylast=True)  # after -m/-k deselection: a run without vm tests boots nothing
def pytest_collection_modifyitems(session, config, items):
    vm_items = [item for item in items if item.get_closest_marker("vm")]
    if not vm_items:
        return
    mode = vm_mode()
    missing = None if in_vm() else dmcrypt_missing()
    plan = vm_plan(mode, in_vm(), missing)
    if plan == "native":
        return
    skip = (f"vm tests disabled by {MODE_VARIABLE}=off (this machine: {missing}); unset it to run them "
            f"in a VM") if plan == "skip" else None
    shards = [shard for shard in split_by_module(vm_items, vm_count(skip)) if shard]
    runners = [VmRunner(config, [item.nodeid for item in shard], skip) for shard in shards]
    config.stash[RUNNERS_KEY] = runners
    # The VMs run in the background while the host tests run (most of them wait on Slurm, not on the
    # CPU), so the proxies go last: by the time they ask, most of the VMs' work is done.
    proxies = [VmProxy.for_item(item, runner) for shard, runner in zip(shards, runners, strict=True) for item in shard]
    items[:] = [item for item in items if not item.get_closest_marker("vm")] + proxies


def vm_count(skip: str | None) -> int:
    """How many VMs share the vm tests: a guest keeps about one host CPU busy (its tests run one
    process after another), so one VM per CPU, as memory allows (``SPANK_SIF_VMS`` overrides)."""
    if skip:
        return 1
    value = os.environ.get(VMS_VARIABLE, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise pytest.UsageError(f"{VMS_VARIABLE}={value!r}: give a number of VMs, 1 or more")
        return int(value)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    return max(1, min(MAX_VMS, os.cpu_count() or 1, memory_gib // (VM_MEMORY_GIB + 1)))


def split_by_module(items: list, count: int) -> list[list]:
    """``count`` groups of whole test modules (module and session fixtures are built once per VM),
    balanced by each module's cost in ``durations.json`` (seconds measured in the VM; a module not
    listed counts ``DEFAULT_TEST_SECONDS`` a test). Each group keeps the collection order."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    cost = {m: known.get(m, DEFAULT_TEST_SECONDS * len(tests)) for m, tests in modules.items()}
    loads, chosen = [0.0] * count, {}
    for module in sorted(modules, key=lambda m: -cost[m]):  # largest first, into the lightest group
        group = loads.index(min(loads))
        chosen[module], loads[group] = group, loads[group] + cost[module]
    return [[item for m, tests in modules.items() if chosen[m] == g for item in tests] for g in range(count)]


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    if not session.config.option.collectonly:
        for runner in session.config.stash.get(RUNNERS_KEY, []):
            runner.start()


def pytest_unconfigure(config):
    for runner in config.stash.get(RUNNERS_KEY, []):
        runner.cancel()  # an interrupted session never leaves a VM running


@dataclass
class VmOutcome:
    kind: str  # passed, failed, skipped, xfailed
    text: str = ""
    complete: bool = True  # False: the guest gave no complete result (the text says how the run ended)


class VmTestFailure(Exception):
    """The test failed inside the VM, or the VM gave no complete result for it."""


class VmProxy(pytest.Item):
    """Stands for one vm test on the host and reports the result the VM saw for it."""

    @classmethod
    def for_item(cls, item: pytest.Item, runner: "VmRunner") -> "VmProxy":
        proxy = cls.from_parent(item.parent, name=item.name, nodeid=item.nodeid)
        proxy.runner = runner
        proxy.original_reportinfo = item.reportinfo()
        proxy.add_marker("vm")
        return proxy

    def iter_markers_with_node(self, name=None):
        # Only the proxy's own markers: skipif/xfail of the real test are evaluated inside the VM,
        # not here where their conditions (root, dm-crypt, ...) may differ.
        for mark in self.own_markers:
            if name is None or mark.name == name:
                yield self, mark

    def reportinfo(self):
        return self.original_reportinfo

    def runtest(self):
        outcome = self.runner.outcome(self.nodeid)
        if outcome.kind == "skipped":  # reported at the test's location, as a skip of the test itself
            raise pytest.skip.Exception(outcome.text, _use_item_location=True)
        if outcome.kind == "xfailed":
            pytest.xfail(outcome.text)
        if outcome.kind == "failed":
            raise VmTestFailure(outcome.text)

    def teardown(self):
        # A guest run can fail outside every test (an error in a session hook, a hang after the last
        # test): the last proxy reports it as its teardown error, the way pytest reports an error in a
        # session fixture's teardown, so that the host run cannot end green.
        failure = self.runner.run_failure
        if failure and self.nodeid == self.runner.nodeids[-1]:
            raise VmTestFailure(failure)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A proxy's failure is the VM's text (inner traceback, or the reason and the VM's output), never a
    traceback of the harness."""
    report = yield
    if isinstance(item, VmProxy) and call.excinfo and call.excinfo.errisinstance(VmTestFailure):
        report.longrepr = str(call.excinfo.value)
    return report


class VmRunner:
    """Runs all vm tests of the session in one VM, started in the background before the first test
    (``start``); a proxy asking for its outcome waits for the whole run."""

    def __init__(self, config, nodeids: list[str], skip_reason: str | None):
        self.config, self.nodeids, self.skip_reason = config, nodeids, skip_reason
        self.outcomes: dict[str, VmOutcome] | None = None
        self.run_failure: str | None = None  # the guest run failed although every test has a result
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.finished_line = ""

    def start(self) -> None:
        """Boot the VM in a background thread (once). Called in the main thread: the reference tools
        are built here first, because host tests use them too."""
        if self.skip_reason or self.thread is not None:
            return
        try:
            cache = prepare_host_for_fixtures()
        except Exception as e:  # reported on every proxy: the tests cannot run without the tools
            self.outcomes = self.fail_all(f"could not build the reference tools before booting: {e}")
            return
        rundir = self.config._tmp_path_factory.mktemp("vm")
        self.say(f"spank-sif: running {len(self.nodeids)} vm test(s) in a VM in the background, while the "
                 f"host tests run (run directory {rundir})")
        self.thread = threading.Thread(target=self.run_in_background, args=(rundir, cache), daemon=True,
                                       name="spank-sif-vm")
        self.thread.start()

    def cancel(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()

    def outcome(self, nodeid: str) -> VmOutcome:
        if self.skip_reason:
            return VmOutcome("skipped", self.skip_reason)
        self.start()  # a no-op unless no test loop ran before (pytest_runtestloop starts it)
        if self.thread is not None:
            self.thread.join()
            if self.finished_line:
                self.say(self.finished_line)
                self.finished_line = ""
        assert self.outcomes is not None
        return self.outcomes[nodeid]

    def fail_all(self, why: str) -> dict[str, VmOutcome]:
        return {nodeid: VmOutcome("failed", why, complete=False) for nodeid in self.nodeids}

    def run_in_background(self, rundir: Path, cache: Path) -> None:
        try:
            self.outcomes = self.run(rundir, cache)
        except BaseException as e:  # never leave the proxies without an answer
            self.outcomes = self.fail_all(f"the VM run failed on the host: {type(e).__name__}: {e}")

    def run(self, rundir: Path, cache: Path) -> dict[str, VmOutcome]:
        results = rundir / "results.jsonl"
        timeout = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT))
        inifile = ["-c", str(self.config.inipath)] if self.config.inipath else []
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra", *inifile, "--rootdir",
                str(self.config.rootpath), "--junitxml", str(rundir / "vm.xml"), *self.nodeids]
        try:
            vm = run_in_vm(argv, rundir=rundir, rwdirs=(cache,), timeout=timeout, cwd=self.config.rootpath,
                           env={RESULTS_VARIABLE: str(results), **INNER_ENVIRONMENT}, stopping=self.stopping)
        except VmUnavailable as e:
            return self.fail_all(f"cannot start the VM: {e} (or set {MODE_VARIABLE}=off)")
        end = GuestEnd.of(vm, timeout)
        write_module_seconds(rundir / "vm.xml", rundir / "durations.json", self.config.rootpath)
        self.finished_line = f"spank-sif: VM run finished in {vm.seconds:.0f} s: {end.why}"
        lines = results.read_text(errors="replace").splitlines() if results.exists() else []
        outcomes, run_failure = judge(self.nodeids, lines, end)
        where = f"; run directory {rundir}\n{vm.tail()}"  # the first line stays the one-line reason
        if run_failure:
            self.run_failure = run_failure + where
        return {nodeid: o if o.complete else VmOutcome(o.kind, o.text + where, complete=False)
                for nodeid, o in outcomes.items()}

    def say(self, line: str) -> None:
        """A line on the terminal (main thread only: the terminal is the tests' too)."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter and capture:
            with capture.global_and_fixture_disabled():
                reporter.write_line(line)


def write_module_seconds(junit: Path, out: Path, root: Path) -> None:
    """Seconds each test module took in the VM (from the inner run's JUnit XML), the figures
    ``durations.json`` is made of."""
    import xml.etree.ElementTree as ET
    try:
        cases = ET.parse(junit).iter("testcase")
        seconds: dict[str, float] = {}
        for case in cases:
            parts = case.get("classname", "").split(".")  # the module's dotted path, then any class
            module = next((m for i in range(len(parts), 0, -1)
                           if (root / (m := "/".join(parts[:i]) + ".py")).is_file()), None)
            if module is None:
                continue
            seconds[module] = seconds.get(module, 0.0) + float(case.get("time", 0))
    except (OSError, ET.ParseError, ValueError):
        return  # no complete run: nothing to learn from it
    out.write_text(json.dumps({m: round(t) for m, t in sorted(seconds.items())}, indent=1) + "\n")


def prepare_host_for_fixtures() -> Path:
    """Build the reference SIF tools and the MPI test programs here (compilers under emulation are
    slow) and share the fixture cache."""
    import mpi
    import reftools
    reftools.reftools()
    mpi.pmi2_allgather()
    return fixtures.prepare_cache()


@dataclass
class GuestEnd:
    """How the guest run ended."""
    returncode: int | None  # the inner pytest's exit status; None: it never finished
    timed_out: bool
    why: str  # in words, for failure messages

    @classmethod
    def of(cls, vm, timeout: float) -> "GuestEnd":
        if vm.timed_out:
            why = f"the VM run timed out after {timeout:.0f} s ({TIMEOUT_VARIABLE})"
        elif vm.returncode is None:
            why = "the VM run ended without the inner pytest's exit status (boot failure or guest crash)"
        else:
            why = f"the inner pytest exited with status {vm.returncode}"
        return cls(vm.returncode, vm.timed_out, why)


# --------------------------------------------------------------------------- judging the guest's reports
# Fail closed: a test passes only when the guest recorded its setup, call and teardown as passed, and
# the results file is trusted only when every line of it is readable.

PHASES = ("setup", "call", "teardown")
OUTCOMES = ("passed", "failed", "skipped")
REPORT_KEYS = {"nodeid", "when", "outcome", "text", "crash", "xfail"}  # what ResultRecorder writes


def judge(nodeids: list[str], lines: list[str], end: GuestEnd) -> tuple[dict[str, VmOutcome], str | None]:
    """One outcome per test from the guest's report lines (results.jsonl) and how its run ended, and
    the run's own failure when no test's outcome shows it (else None).

    Only the last line of a timed-out run may be unreadable: it was being written when the VM was
    stopped. Any other unreadable line means the file cannot be trusted, so every test fails."""
    reports: dict[str, list[dict]] = {nodeid: [] for nodeid in nodeids}
    cut_off = None
    for number, line in enumerate(lines, 1):
        report = parse_report(line)
        if report is None and number == len(lines) and end.timed_out:
            cut_off = cut_nodeid(line)
        elif report is None:
            why = (f"line {number} of {len(lines)} of the VM's results.jsonl is unreadable, so no result of "
                   f"this VM run can be trusted ({end.why}): {line[:100]!r}")
            return {nodeid: VmOutcome("failed", why, complete=False) for nodeid in nodeids}, None
        elif report["nodeid"] in reports:
            reports[report["nodeid"]].append(report)
    outcomes = {nodeid: outcome_of(rs, end, cut=nodeid == cut_off) for nodeid, rs in reports.items()}
    return outcomes, unexplained(end, outcomes)


def parse_report(line: str) -> dict | None:
    """One report the guest wrote, or None if the line is not a whole, well-formed report."""
    if not line.isascii():  # json.dumps writes ASCII only: anything else is damage (NUL bytes, garbage)
        return None
    try:
        report = json.loads(line)
    except ValueError:
        return None
    wellformed = (isinstance(report, dict) and report.keys() >= REPORT_KEYS and isinstance(report["nodeid"], str)
                  and report["when"] in PHASES and report["outcome"] in OUTCOMES)
    return report if wellformed else None


def cut_nodeid(line: str) -> str | None:
    """The node id at the start of a cut-off report line, if that much of it was written."""
    match = re.match(r'\{"nodeid": ("(?:[^"\\]|\\.)*")', line)
    return json.loads(match.group(1)) if match else None


def outcome_of(reports: list[dict], end: GuestEnd, cut: bool) -> VmOutcome:
    """One test's outcome: a result is complete only with its teardown report (the last one pytest
    makes), and a pass needs setup, call and teardown passed; a skip in setup has no call."""
    phases = {r["when"]: r for r in reports}
    complete = "teardown" in phases and not cut
    failed = [r for r in reports if r["outcome"] == "failed"]
    if failed:
        text = "\n".join(failure_text(r) for r in failed)
        if not complete:
            text += "\n" + incomplete_text(reports, end, cut)
        return VmOutcome("failed", text, complete)
    if complete:
        skipped = next((r for r in reports if r["outcome"] == "skipped"), None)
        if skipped:
            return VmOutcome("xfailed" if skipped["xfail"] is not None else "skipped",
                             skipped["xfail"] or skipped["text"])
        if all(phases.get(when, {}).get("outcome") == "passed" for when in PHASES):
            return VmOutcome("passed")
    return VmOutcome("failed", incomplete_text(reports, end, cut), complete=False)


def incomplete_text(reports: list[dict], end: GuestEnd, cut: bool) -> str:
    recorded = ", ".join(f"{r['when']} {r['outcome']}" for r in reports) or "nothing"
    if cut:
        recorded += ", then a line cut off when the VM was stopped"
    return f"no complete result from the VM (it recorded: {recorded}): {end.why}"


def unexplained(end: GuestEnd, outcomes: dict[str, VmOutcome]) -> str | None:
    """The failure of a guest run that ended badly although every test has a complete result: an
    error outside the tests (session hooks, a hang after the last test) must still fail the host run."""
    if end.returncode == 0 and not end.timed_out:
        return None
    if not all(o.complete for o in outcomes.values()):
        return None  # those tests fail, saying how the run ended
    if end.returncode == 1 and any(o.kind == "failed" for o in outcomes.values()):
        return None  # pytest's status when tests failed
    return f"the VM run failed outside the vm tests, after each had a complete result: {end.why}"


def failure_text(report: dict) -> str:
    """The inner report, headed by a line pytest's short summary shows: where it failed and why."""
    where = "failed" if report["when"] == "call" else f"error in {report['when']}"
    cause = (report["crash"] or report["text"]).partition("\n")[0]  # a bare message has no crash line
    return f"{where} inside the VM: {cause}\n{report['text']}"


# --------------------------------------------------------------------------------------------- guest side

class ResultRecorder:
    """Inside the VM: one JSON line per test report, appended as tests run (a crash keeps the rest)."""

    def __init__(self, path: str):
        self.path = path

    def pytest_runtest_logreport(self, report):
        if report.skipped and isinstance(report.longrepr, tuple):
            text = report.longrepr[2].removeprefix("Skipped: ")
        else:
            text = report.longreprtext
            for title, content in report.sections:
                text += f"\n{'-' * 20} {title} {'-' * 20}\n{content}"
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
        record = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "text": text,
                  "crash": crash, "xfail": getattr(report, "wasxfail", None)}
        # One write per line: a VM stopped mid-write cuts at most the last line, which the host detects.
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while line:
                line = line[os.write(fd, line):]
        finally:
            os.close(fd)


def pytest_configure(config):
    if in_vm() and os.environ.get(RESULTS_VARIABLE):
        config.pluginmanager.register(ResultRecorder(os.environ[RESULTS_VARIABLE]), "spank-sif-vm-results")


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def ref_images(tmp_path_factory) -> fixtures.RefImages:
    """Reference SIF images built with the real cryptsetup on dm-crypt (see docs/testing.md)."""
    missing = None if in_vm() else dmcrypt_missing()
    if missing:
        pytest.fail(f"ref_images needs dm-crypt ({missing}): mark the test @pytest.mark.vm")
    return fixtures.ref_images(tmp_path_factory.mktemp("ref-images"))
