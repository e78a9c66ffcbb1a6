"""A pytest plugin: a run in which any test without the ``gpu`` marker was skipped fails.

Only tests that need an NVIDIA GPU and TensorRT-LLM (marked ``@pytest.mark.gpu``) may skip; any
other skip (a missing optional package, a missing data file, a skip left in a test) hides a check,
so it turns a passing run into a failing one (exit status 1) and the terminal summary lists each
such skip with its reason. Skips at collection time (``pytest.importorskip`` at module level, a
module-level ``pytest.skip``) count too. xfail is not a skip.

tests/conftest.py registers this plugin; tests/test_skip_policy.py runs it on small inner test files.
"""

from __future__ import annotations

import pytest


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


class SkipPolicy:
    """The plugin's state for one run: the skips seen so far that were not allowed."""

    def __init__(self) -> None:
        self.skips: list[tuple[str, str]] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
            self.skips.append((item.nodeid, _reason(report)))
        return report

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a whole module skipped while collecting: no item, no marker to look at
            self.skips.append((report.nodeid, _reason(report)))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        if not self.skips:
            return
        terminalreporter.section("skipped without the gpu marker: the run fails", sep="=", red=True, bold=True)
        for nodeid, reason in self.skips:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
        terminalreporter.line("Only tests marked @pytest.mark.gpu may skip; make the others pass or fail.")


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("skip-policy"):
        config.pluginmanager.register(SkipPolicy(), "skip-policy")
