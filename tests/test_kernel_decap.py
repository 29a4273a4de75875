"""underlay_tc built for the kernel ingress hook (FXDP_KERNEL_DECAP), through BPF_PROG_TEST_RUN.

In that build the program judges exactly as the BPF decap does (the same table as
tests/test_packets.py states for underlay_xdp), but a frame it accepts leaves it
whole, with TC_ACT_OK, for flannel.<VNI>'s vxlan device to decapsulate; it is still
counted as decap with its inner frame's length. Real traffic through the kernel hook
is in tests/test_integration.py and tests/test_lab_e2e.py.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from flannel_xdp import netns
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.compile import BuildParams, compile_program
from flannel_xdp.maps.libbpf import prog_test_run
from flannel_xdp.maps.views import NodeConfigMap, NodeSettings, SubnetsMap
from tests.packet_support import (
    OWN_IP,
    OWN_SUBNET,
    OWN_VTEP,
    PEER_A,
    PEERS,
    PORT,
    VNI,
    VXLAN_OVERHEAD,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    Counters,
    setup_underlay,
    temp_netns,
    udp_packet,
    vxlan_frame,
)
from tests.requirements import require_root_and_bcc
from tests.test_packets import UNDERLAY_CASES, refused_by_test_run

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT = 0, 2
KERNEL_VERDICT = {XDP_PASS: TC_ACT_OK, XDP_DROP: TC_ACT_SHOT, XDP_REDIRECT: TC_ACT_OK}


@pytest.fixture(scope="module")
def judge():
    """(run, counters): underlay_tc built with kernel decap, on a node configured as in
    tests/test_packets.py."""
    require_root_and_bcc()
    from bcc import BPF

    tag = f"fxdp-kd-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(temp_netns(tag))
        underlay, tunnel, _ = setup_underlay(ns)
        pins = PinDir(f"/sys/fs/bpf/{tag}")
        stack.callback(pins.remove)
        pins.ensure()
        module = compile_program(
            "underlay_tc", BuildParams(maps_dir=pins.maps, max_subnets=64, kernel_decap=True)
        )
        stack.callback(module.cleanup)
        fd = module.load_func(b"underlay_tc", BPF.SCHED_CLS).fd
        with NodeConfigMap(pins.maps) as m:
            m.write(
                NodeSettings(
                    public_ip=OWN_IP,
                    subnet=OWN_SUBNET,
                    vni=VNI,
                    vxlan_port=PORT,
                    vtep_mac=OWN_VTEP,
                    underlay_ifindex=underlay,
                    tunnel_ifindex=tunnel,
                    tunnel_peer_ifindex=0,  # the vxlan device has no peer
                )
            )
        with SubnetsMap(pins.maps) as m:
            m.apply([p.peer() for p in PEERS])
        counters = Counters(pins.maps)
        stack.callback(counters.close)

        def run(frame: bytes):
            before = counters.snapshot()
            with netns.entered(ns):
                rv, out, _ = prog_test_run(fd, frame)
            return rv, out, Counters.delta(before, counters.snapshot())

        yield run
    assert not os.path.exists(pins.root), f"{pins.root} left behind"


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
