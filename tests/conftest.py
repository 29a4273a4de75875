"""Shared fixtures and hooks for the tests that build lab clusters."""

from __future__ import annotations

import pytest

from tests.requirements import require_root_and_bcc

# Everything the lab and the traffic tests run (iproute2, util-linux, bpftool, iputils, iperf3).
LAB_TOOLS = ("ip", "nsenter", "bpftool", "ethtool", "ping", "iperf3", "ss")


@pytest.fixture(scope="session")
def lab_prerequisites() -> None:
    """Fail (never skip) with the reason when the machine cannot run a lab."""
    require_root_and_bcc(*LAB_TOOLS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach the lab's links, routes, neighbours and BPF counters to a failed test's
    report: the first things to read when traffic does not flow, taken before the
    cluster is torn down."""
    report = yield
    if report.when == "call" and report.failed:
        # every lab the test used (Cluster or AgentCluster), whatever its fixture is called
        for name, value in getattr(item, "funcargs", {}).items():
            diagnostics = getattr(value, "diagnostics", None)
            if not callable(diagnostics):
                continue
            try:
                report.sections.append((f"lab diagnostics ({name})", diagnostics()))
            except Exception as exc:  # diagnostics must never hide the real failure
                report.sections.append((f"lab diagnostics ({name})", f"unavailable: {exc!r}"))
    return report
