"""underlay_tc built for the kernel ingress hook (FXDP_KERNEL_DECAP), through BPF_PROG_TEST_RUN.

In that build the program judges exactly as the BPF decap does (the same table as
tests/test_packets.py states for underlay_xdp), but a frame it accepts leaves it
whole, with TC_ACT_OK, for flannel.<VNI>'s vxlan device to decapsulate; it is still
counted as decap with its inner frame's length. Real traffic through the kernel hook
is in tests/test_integration.py and tests/test_lab_e2e.py.
"""

from __future__ import annotations

import os

import pytest

from flannel_xdp.lab.frames import VXLAN_OVERHEAD
from tests.packet_support import (
    OWN_SUBNET,
    PEER_A,
    UNDERLAY_CASES,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    program_lab,
    refused_by_test_run,
    udp_packet,
    vxlan_frame,
)
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.bpf

TC_ACT_OK, TC_ACT_SHOT = 0, 2
KERNEL_VERDICT = {XDP_PASS: TC_ACT_OK, XDP_DROP: TC_ACT_SHOT, XDP_REDIRECT: TC_ACT_OK}


@pytest.fixture(scope="module")
def judge():
    """Run underlay_tc's kernel-hook build on a frame, on a node configured as in
    tests/test_packets.py: (verdict, output, counter delta)."""
    require_root_and_bcc()
    with program_lab(f"fxdp-kd-{os.getpid()}") as lab:
        lab.configure()
        yield lambda frame: lab.counted("kernel", frame)


@pytest.mark.parametrize("case", list(UNDERLAY_CASES))
def test_same_verdicts_as_the_bpf_decap_but_accepted_frames_stay_whole(judge, case):
    frame, xdp_verdict, key = UNDERLAY_CASES[case]
    if refused_by_test_run("tc", frame):
        pytest.fail(f"case {case}: BPF_PROG_TEST_RUN refuses this frame for tc; pick another")
    rv, out, delta = judge(frame)
    assert rv == KERNEL_VERDICT[xdp_verdict]
    assert out == frame, "the kernel-decap build never rewrites a frame"
    if xdp_verdict == XDP_REDIRECT:
        assert list(delta) == [("traffic", "vxlan", "decap")], delta
        assert delta[("traffic", "vxlan", "decap")] == (1, len(frame) - VXLAN_OVERHEAD)
    else:
        assert list(delta) == [key], delta
        assert delta[key][0] == 1


def test_accepted_vxlan_is_counted_with_its_inner_length(judge):
    inner = udp_packet(PEER_A.host(9), str(OWN_SUBNET.network_address + 5), 1, 2, b"x" * 1000)
    frame = vxlan_frame(inner)
    rv, out, delta = judge(frame)
    assert (rv, out) == (TC_ACT_OK, frame)
    assert delta == {("traffic", "vxlan", "decap"): (1, len(frame) - VXLAN_OVERHEAD)}
