"""The checks behind exit code 2, one by one, without a kernel or etcd (tests/test_bad_config.py
runs them through a real agent): flanneld's SubnetLen rules, the Network against the underlay,
capabilities, the --bpffs location, listen addresses, the fast path's flags and probe."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest

from flannel_xdp.agent import flags, privileges
from flannel_xdp.cli import build_parser
from flannel_xdp.loader import fast_path
from flannel_xdp.loader.bpffs import BpffsError, PinDir
from flannel_xdp.loader.fast_path import Lack, Mode, OffReason
from flannel_xdp.metrics.agent import AgentCollector, ControlPlane
from flannel_xdp.registry.config import ConfigError, check_underlay, parse_config

pytestmark = pytest.mark.unit


def config(network: str, subnet_len: int | None = None, **extra: str):
    text = f'{{"Network": "{network}", "Backend": {{"Type": "vxlan"}}'
    if subnet_len is not None:
        text += f', "SubnetLen": {subnet_len}'
    text += "".join(f', "{k}": "{v}"' for k, v in extra.items())
    return parse_config(text + "}")


@pytest.mark.parametrize(
    ("network", "subnet_len", "want"),
    [
        ("198.18.0.0/16", None, 24),  # /22 or wider: /24
        ("198.18.0.0/23", None, 25),  # narrower: prefix + 2
        ("198.18.0.0/28", None, 30),  # the smallest network flanneld takes
        ("198.18.0.0/16", 18, 18),  # room for four subnets
        ("198.18.0.0/16", 30, 30),
        ("198.18.0.0/16", 0, 24),  # 0 is unset, as in flanneld
    ],
)
def test_subnet_len_as_flanneld(network, subnet_len, want):
    assert config(network, subnet_len).subnet_len == want


@pytest.mark.parametrize(
    ("network", "subnet_len", "message"),
    [
        (
            "198.18.0.0/16",
            17,
            "SubnetLen: /17 leaves Network 198.18.0.0/16 room for fewer than four",
        ),
        ("198.18.0.0/16", 16, "SubnetLen: /16 leaves"),
        ("198.18.0.0/16", 31, "SubnetLen: must be at most 30, got 31"),
        ("198.18.0.0/29", None, "Network: 198.18.0.0/29 is too small"),
        ("198.18.0.0/16", -8, "SubnetLen: must not be negative"),
    ],
)
def test_subnet_len_out_of_range(network, subnet_len, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config(network, subnet_len)


def test_zero_subnet_min_and_max_are_unset_as_in_flanneld():
    c = config("198.18.0.0/16", SubnetMin="0.0.0.0", SubnetMax="0.0.0.0")
    assert (str(c.subnet_min), str(c.subnet_max)) == ("198.18.1.0", "198.18.255.0")


@pytest.mark.parametrize(
    ("network", "address", "public_ip", "message"),
    [
        ("192.0.2.0/24", "192.0.2.10/24", "192.0.2.10", "contains this node's public IP"),
        ("198.18.0.0/16", "192.0.2.10/24", "198.18.3.3", "contains this node's public IP"),
        ("192.0.2.0/24", "192.0.2.10/24", "198.51.100.1", "contains 192.0.2.10, the address of"),
        ("192.0.2.128/25", "192.0.2.10/24", "192.0.2.10", "overlaps 192.0.2.0/24, the on-link"),
        ("192.0.0.0/16", "192.0.2.10/32", "198.51.100.1", "contains 192.0.2.10"),
    ],
)
def test_network_overlapping_the_underlay_is_refused(network, address, public_ip, message):
    with pytest.raises(ConfigError, match=message):
        check_underlay(config(network), "ul0", IPv4Interface(address), IPv4Address(public_ip))


def test_network_beside_the_underlay_is_fine():
    check_underlay(
        config("198.18.0.0/16"), "ul0", IPv4Interface("192.0.2.10/24"), IPv4Address("192.0.2.10")
    )


def test_capabilities():
    every = (1 << 41) - 1
    assert privileges.problem(every) is None
    no_net_admin = every & ~(1 << 12)
    assert privileges.problem(no_net_admin).startswith("missing capability: CAP_NET_ADMIN (")
    # CAP_BPF (39) and CAP_PERFMON (38) without CAP_SYS_ADMIN do not do for bcc
    bpf_only = (1 << 12) | (1 << 38) | (1 << 39)
    assert privileges.problem(bpf_only).startswith("missing capability: CAP_SYS_ADMIN (")
    both = privileges.problem(0)
    assert both and "CAP_NET_ADMIN" in both and "CAP_SYS_ADMIN" in both
    assert privileges.effective_capabilities() >= 0  # /proc/self/status parses


def test_bpffs_location(tmp_path):
    assert PinDir("/sys/fs/bpf/fxdp-never-made/x").check() in (False, True)  # no raise
    with pytest.raises(BpffsError, match="not on a bpf filesystem"):
        PinDir(str(tmp_path / "pins")).check()
    (tmp_path / "f").write_text("")
    with pytest.raises(BpffsError, match="exists and is not a directory"):
        PinDir(str(tmp_path / "f" / "pins")).check()
    assert not (tmp_path / "pins").exists(), "check() made something"


def agent_args(*argv: str):
    return build_parser().parse_args(["agent", *argv])


def test_listen_addresses(monkeypatch):
    opts = flags.options_from(agent_args())
    assert (opts.healthz_ip, opts.metrics_ip) == ("0.0.0.0", "0.0.0.0")  # flanneld's default
    opts = flags.options_from(agent_args("--healthz-ip", "127.0.0.1", "--metrics-ip", "::1"))
    assert (opts.healthz_ip, opts.metrics_ip) == ("127.0.0.1", "::1")
    monkeypatch.setenv("FLANNELD_HEALTHZ_IP", "192.0.2.10")
    monkeypatch.setenv("FLANNELD_METRICS_IP", "192.0.2.11")
    opts = flags.options_from(agent_args())
    assert (opts.healthz_ip, opts.metrics_ip) == ("192.0.2.10", "192.0.2.11")
    with pytest.raises(ValueError, match="--healthz-ip: 'eth0' is not an IP address"):
        flags.options_from(agent_args("--healthz-ip", "eth0"))


# -- the fast path: --fast-path, its aliases, the kernel probe, what is exported ---------


@pytest.mark.parametrize(
    ("argv", "udp", "tcp"),
    [
        ((), "auto", "auto"),  # as shipped
        (("--fast-path", "off"), "off", "off"),
        (("--fast-path", "on"), "on", "auto"),
        (("--udp-fast-path",), "on", "auto"),  # the alias of --fast-path on
        (("--tcp-fast-path",), "on", "on"),  # on, and TCP required at start
        (("--fast-path", "on", "--tcp-fast-path"), "on", "on"),
    ],
)
def test_fast_path_flags_and_their_aliases(argv, udp, tcp):
    wanted = flags.options_from(agent_args(*argv)).fast_path
    assert (wanted.udp.value, wanted.tcp.value) == (udp, tcp)


def test_fast_path_off_is_one_switch(monkeypatch):
    monkeypatch.setenv("FLANNELD_FAST_PATH", "off")
    assert flags.options_from(agent_args()).fast_path == fast_path.Wanted(Mode.OFF, Mode.OFF)
    for alias in ("--udp-fast-path", "--tcp-fast-path"):
        with pytest.raises(ValueError, match=f"{alias} contradicts --fast-path off"):
            flags.options_from(agent_args(alias))
    monkeypatch.setenv("FLANNELD_FAST_PATH", "yes")
    with pytest.raises(ValueError, match="--fast-path: 'yes'; choose auto, on, off"):
        flags.options_from(agent_args())


def test_the_probe_reports_what_the_test_only_variable_says_is_missing(monkeypatch):
    monkeypatch.setenv(fast_path.LACK_ENV, "kfuncs,tcx")
    lacks = fast_path.kernel_lacks()
    assert set(lacks) == {Lack.KFUNCS, Lack.TCX}
    assert all(f"{fast_path.LACK_ENV} says so" in why for why in lacks.values())
    monkeypatch.setenv(fast_path.LACK_ENV, "kfuncs,btf")
    with pytest.raises(ValueError, match=r"FXDP_TEST_KERNEL_LACKS: unknown \['btf'\]"):
        fast_path.kernel_lacks()


FITS_WHERE = "this node runs vxlan with the xdp hook"


@pytest.mark.parametrize(
    ("mode", "lacks", "fits", "reason"),
    [
        (Mode.AUTO, {}, True, None),
        (Mode.ON, {}, True, None),
        (Mode.OFF, {}, True, OffReason.TURNED_OFF),
        (Mode.AUTO, {Lack.KFUNCS: "no kfuncs"}, True, OffReason.KERNEL_NO_KFUNCS),
        (Mode.AUTO, {Lack.TCX: "no tcx"}, True, OffReason.KERNEL_NO_TCX),
        (Mode.AUTO, {}, False, OffReason.NOT_BUILT),
        (Mode.OFF, {Lack.TCX: "no tcx"}, False, OffReason.TURNED_OFF),
    ],
)
def test_where_udp_takes_the_fast_path(mode, lacks, fits, reason):
    state = fast_path.udp_state(mode, lacks, fits, FITS_WHERE)
    assert (state.on, state.reason) == (reason is None, reason)


def test_fast_path_on_makes_what_is_missing_an_error():
    with pytest.raises(ValueError, match="--fast-path on: no kfuncs; no tcx"):
        fast_path.udp_state(Mode.ON, {Lack.KFUNCS: "no kfuncs", Lack.TCX: "no tcx"}, True, "")
    with pytest.raises(ValueError, match=f"--fast-path on: the fast path fits .*; {FITS_WHERE}"):
        fast_path.udp_state(Mode.ON, {}, False, FITS_WHERE)


def test_the_fast_path_metrics():
    status = ControlPlane(fast_path={"udp": "", "tcp": OffReason.CONNTRACK_TCP.value})
    found = {
        (m.name, tuple(sorted(s.labels.items()))): s.value
        for m in AgentCollector(lambda: status).collect()
        for s in m.samples
        if m.name.startswith("flannel_xdp_fast_path")
    }
    assert found == {
        ("flannel_xdp_fast_path", (("proto", "udp"),)): 1,
        ("flannel_xdp_fast_path", (("proto", "tcp"),)): 0,
        ("flannel_xdp_fast_path_off", (("proto", "tcp"), ("reason", "conntrack_tcp"))): 1,
    }
