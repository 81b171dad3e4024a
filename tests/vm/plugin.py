"""pytest side of the VM harness.

On a machine without dm-crypt, every selected ``@pytest.mark.vm`` test is replaced at collection time by
a proxy with the same node id. The first proxy to run boots ONE VM which runs all of them with the same
Python (``pytest <node ids>``); each proxy then reports what the VM saw: passed, failed (with the inner
report), skipped or xfailed (with the reason), or failed with the end of the VM's output when the VM
produced no result for it. Inside the VM, or on a machine with dm-crypt, vm tests run as they are.

Environment: ``SPANK_SIF_VM`` = ``auto`` (default) | ``off`` (skip vm tests unless this machine has
dm-crypt) | ``force`` (use the VM even if this machine has dm-crypt); ``SPANK_SIF_VM_TIMEOUT`` (seconds
for the whole VM run, default 1800). See docs/testing.md.
"""
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import fixtures
from .capability import dmcrypt_missing, in_vm
from .harness import DEFAULT_TIMEOUT, VmUnavailable, run_in_vm

MODE_VARIABLE = "SPANK_SIF_VM"
TIMEOUT_VARIABLE = "SPANK_SIF_VM_TIMEOUT"
RESULTS_VARIABLE = "SPANK_SIF_VM_RESULTS"  # set by the host for the pytest run inside the VM
MODES = ("auto", "off", "force")
# Python start-up is slow under emulation (imports over 9p): importing pytest takes ~30 s in the guest,
# the autoloaded hypothesis and pytest-benchmark plugins ~70 s more. The inner run loads only the
# plugins the tests name (``pytest_plugins`` in conftest.py, ``-p``); hypothesis works without its plugin.
INNER_ENVIRONMENT = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


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
    runner = VmRunner(config, [item.nodeid for item in vm_items], skip)
    proxies = {id(item): VmProxy.for_item(item, runner) for item in vm_items}
    items[:] = [proxies.get(id(item), item) for item in items]


@dataclass
class VmOutcome:
    kind: str  # passed, failed, skipped, xfailed
    text: str = ""


class VmTestFailure(Exception):
    """The test failed inside the VM, or the VM gave no result for it."""


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

    def repr_failure(self, excinfo, style=None):
        if excinfo.errisinstance(VmTestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


class VmRunner:
    """Runs all vm tests of the session in one VM, the first time a result is asked for."""

    def __init__(self, config, nodeids: list[str], skip_reason: str | None):
        self.config, self.nodeids, self.skip_reason = config, nodeids, skip_reason
        self.outcomes: dict[str, VmOutcome] | None = None
        self.missing = VmOutcome("failed", "the VM did not run")

    def outcome(self, nodeid: str) -> VmOutcome:
        if self.skip_reason:
            return VmOutcome("skipped", self.skip_reason)
        if self.outcomes is None:
            self.outcomes = self.run()
        return self.outcomes.get(nodeid) or self.missing

    def run(self) -> dict[str, VmOutcome]:
        rundir = self.config._tmp_path_factory.mktemp("vm")
        results = rundir / "results.jsonl"
        timeout = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT))
        try:
            cache = prepare_host_for_fixtures()
        except Exception as e:  # reported on every proxy: the tests cannot run without the tools
            self.missing = VmOutcome("failed", f"could not build the reference tools before booting: {e}")
            return {}
        inifile = ["-c", str(self.config.inipath)] if self.config.inipath else []
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra", *inifile, "--rootdir",
                str(self.config.rootpath), "--junitxml", str(rundir / "vm.xml"), *self.nodeids]
        self.say(f"spank-sif: running {len(self.nodeids)} vm test(s) in a VM (run directory {rundir})")
        try:
            vm = run_in_vm(argv, rundir=rundir, rwdirs=(cache,), timeout=timeout, cwd=self.config.rootpath,
                           env={RESULTS_VARIABLE: str(results), **INNER_ENVIRONMENT})
        except VmUnavailable as e:
            self.missing = VmOutcome("failed", f"cannot start the VM: {e} (or set {MODE_VARIABLE}=off)")
            return {}
        why = (f"the VM run timed out after {timeout:.0f} s ({TIMEOUT_VARIABLE})" if vm.timed_out
               else "the VM gave no result for this test")
        self.say(f"spank-sif: VM run finished in {vm.seconds:.0f} s: " + (
            f"inner pytest exit status {vm.returncode}" if vm.returncode is not None else why))
        self.missing = VmOutcome("failed", f"{why}; run directory {rundir}\n{vm.tail()}")
        return outcomes_from(results)

    def say(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter and capture:
            with capture.global_and_fixture_disabled():
                reporter.write_line(line)


def prepare_host_for_fixtures() -> Path:
    """Build the reference SIF tools here (Go under emulation is slow) and share the fixture cache."""
    import reftools
    reftools.reftools()
    return fixtures.prepare_cache()


def outcomes_from(results: Path) -> dict[str, VmOutcome]:
    """The test reports the VM wrote (one JSON line per setup/call/teardown), one outcome per test."""
    reports: dict[str, list[dict]] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            try:
                report = json.loads(line)
            except ValueError:
                continue  # the last line, cut short when the VM was stopped
            reports.setdefault(report["nodeid"], []).append(report)
    return {nodeid: outcome for nodeid, rs in reports.items() if (outcome := outcome_of(rs))}


def outcome_of(reports: list[dict]) -> VmOutcome | None:
    """None when the test did not finish (the run's failure then explains why)."""
    failed = [r for r in reports if r["outcome"] == "failed"]
    if failed:
        return VmOutcome("failed", "\n".join(failure_text(r) for r in failed))
    for r in reports:
        if r["outcome"] == "skipped":
            return VmOutcome("xfailed" if r["xfail"] is not None else "skipped", r["xfail"] or r["text"])
    if any(r["when"] == "call" and r["outcome"] == "passed" for r in reports):
        return VmOutcome("passed")
    return None


def failure_text(report: dict) -> str:
    """The inner report, headed by a line pytest's short summary shows: where it failed and why."""
    where = "failed" if report["when"] == "call" else f"error in {report['when']}"
    cause = (report["crash"] or "").partition("\n")[0]
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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


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
