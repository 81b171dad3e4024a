"""Strict mode (``SPANK_SIF_STRICT=1``, set by scripts/test.sh, so by CI): every selected test must run.

A skip hides a test as well as deleting it would: in strict mode a skipped test fails with its skip
reason, and so do xfailed and xpassed tests (marking a test xfail is not a way around a skip). A module
skipped at collection becomes a collection error. Selecting tests with ``-m``/``-k`` is not a skip.
Outside strict mode skips stay skips, so a developer can still opt out locally (``SPANK_SIF_VM=off``).
See docs/testing.md.
"""
import os

import pytest

STRICT_VARIABLE = "SPANK_SIF_STRICT"


def strict() -> bool:
    return os.environ.get(STRICT_VARIABLE, "") not in ("", "0")


def not_run(what: str, reason: str) -> str:
    return f"{what} in strict mode ({STRICT_VARIABLE}=1), where every test must run: {reason or '(no reason given)'}"


def skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple):  # (path, line, "Skipped: reason")
        return longrepr[2].removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: sees the report after the skipping plugin
def pytest_runtest_makereport(item, call):
    report = yield
    if strict():
        if hasattr(report, "wasxfail"):
            what = "xfailed" if report.skipped else "xpassed"
            reason = report.wasxfail
            del report.wasxfail  # else pytest would still count it as an xfail
            report.outcome, report.longrepr = "failed", not_run(what, reason)
        elif report.skipped:
            report.outcome, report.longrepr = "failed", not_run("skipped", skip_reason(report.longrepr))
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    report = yield
    if strict() and report.skipped:
        report.outcome, report.longrepr = "failed", not_run("skipped at collection",
                                                            skip_reason(report.longrepr))
    return report
