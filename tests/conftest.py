"""Shared fixtures and hooks: the test tiers, and the lab clusters' diagnostics."""

from __future__ import annotations

import pytest

from tests.requirements import require_root_and_bcc

# Everything the lab and the traffic tests run (iproute2, util-linux, bpftool, iputils, iperf3).
LAB_TOOLS = ("ip", "nsenter", "bpftool", "ethtool", "ping", "iperf3", "ss")

# Each test belongs to exactly one tier (declared in pyproject.toml), so that `make unit`
# (-m unit) and the other selections together run every test once.
TIERS = ("unit", "bpf", "etcd", "lab", "peers", "kube")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            have = ", ".join(tiers) if tiers else "none"
            problems.append(f"  {item.nodeid}: {have}")
    if problems:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker of {', '.join(TIERS)} "
            "(a module-level `pytestmark = pytest.mark.<tier>`, or one mark per test); "
            "these have none or several:\n" + "\n".join(problems)
        )


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
