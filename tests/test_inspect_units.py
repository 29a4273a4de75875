"""`flannel-xdp inspect` names what the programs did not forward as the metrics do."""

from __future__ import annotations

import pytest

from flannel_xdp.cli.inspect import Report, reason_rows, render

pytestmark = pytest.mark.unit


def test_reasons_carry_the_metrics_labels():
    rows = reason_rows(
        {
            ("vxlan", "DROP_UNKNOWN_SOURCE"): (3, 300),
            ("none", "PASS_NOT_UDP"): (7, 700),
            ("host-gw", "DROP_TOO_BIG"): (0, 0),  # nothing counted: not shown
        }
    )
    assert rows == [
        {"backend": "vxlan", "verdict": "drop", "reason": "unknown_source", "packets": 3,
         "bytes": 300},
        {"backend": "none", "verdict": "pass", "reason": "not_udp", "packets": 7, "bytes": 700},
    ]  # fmt: skip
    text = render(Report("/sys/fs/bpf/x", node=None, peers=[], programs=[], reasons=rows))
    assert "drop unknown_source" in text and "pass not_udp" in text
    assert "drop_unknown_source" not in text
