"""The agent-driven lab's pure parts: options, naming, state files, parsing (no root)."""

from __future__ import annotations

import argparse
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from flannel_xdp import cli
from flannel_xdp.backend import Backend
from flannel_xdp.lab import agentcluster, agents, demo, kubelab, options, traffic
from flannel_xdp.lab.agentcluster import AgentCluster, AgentClusterSpec, LabNode
from flannel_xdp.lab.topology import Dataplane, LabError, Pod
from flannel_xdp.loader import datapath
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.loader.fast_path import DEFAULT_MODE, Mode
from tests import release_support

pytestmark = pytest.mark.unit


def test_cli_choices_match_the_enums():
    # options.py spells the choices out so that `flannel-xdp agent` never imports the lab
    assert set(options.BACKENDS) == {b.value for b in Backend}
    assert set(options.INGRESS_HOOKS) == {h.value for h in IngressHook}
    assert set(options.FAST_PATH_MODES) == {m.value for m in Mode}
    assert options.DEFAULT_LAB_NAME == agentcluster.DEFAULT_NAME
    assert options.RUN_ROOT == agentcluster.RUN_ROOT


def test_cli_parses_lab_and_demo_commands():
    parser = cli.build_parser()
    up = parser.parse_args(
        ["lab", "up", "--nodes", "4", "--backend", "host-gw", "--stock", "1", "--no-ip-masq"]
    )
    assert (up.nodes, up.backend, up.stock, up.ip_masq, up.name) == (4, "host-gw", 1, False, None)
    assert callable(up.func)
    d = parser.parse_args(["demo", "--keep", "--direct-routing"])
    assert d.keep and d.direct_routing and d.name == options.DEFAULT_DEMO_NAME
    with pytest.raises(SystemExit):
        parser.parse_args(["lab"])  # up|down|status is required


def test_spec_validation_and_net_conf():
    spec = AgentClusterSpec(name="abc", direct_routing=True)
    assert spec.net_conf() == {
        "Network": "198.18.0.0/16",
        "Backend": {"Type": "vxlan", "DirectRouting": True},
    }
    assert AgentClusterSpec(name="abc", backend=Backend.HOST_GW).net_conf() == {
        "Network": "198.18.0.0/16",
        "Backend": {"Type": "host-gw"},
    }
    for bad in (
        AgentClusterSpec(name="Bad"),
        AgentClusterSpec(name="has-dash"),
        AgentClusterSpec(name="x" * 13),
        AgentClusterSpec(name="ok", stock=4, nodes=3),
        AgentClusterSpec(name="ok", nodes=0),
        AgentClusterSpec(name="ok", backend=Backend.HOST_GW, direct_routing=True),
    ):
        with pytest.raises(LabError):
            bad.validate()


def test_naming_and_plan_without_touching_the_system():
    lab = AgentCluster(AgentClusterSpec(name="unit", nodes=3, stock=1, run_root="/nonexistent"))
    assert lab.prefix == "fxlab-unit"
    assert [n.netns for n in lab.nodes] == ["fxlab-unit-n0", "fxlab-unit-n1", "fxlab-unit-n2"]
    assert [n.dataplane for n in lab.nodes] == [
        Dataplane.FLANNEL_XDP,
        Dataplane.FLANNEL_XDP,
        Dataplane.FLANNELD,
    ]
    assert [str(n.public_ip) for n in lab.nodes] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert [str(n.outside_ip) for n in lab.nodes] == [
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.3",
    ]
    assert str(lab.outside_ip) == "198.51.100.254"
    assert lab.nodes[0].bpffs == "/sys/fs/bpf/fxlab-unit-n0"
    assert lab.nodes[0].subnet_file == "/nonexistent/unit/n0/subnet.env"
    assert lab.nodes[2].log_file.endswith("flanneld.log")
    # "fxlab-unit-" never matches another lab whose name merely starts with "unit"
    assert not "fxlab-unit2-n0".startswith(lab.prefix + "-")


def test_spec_and_nodes_survive_the_state_file():
    spec = AgentClusterSpec(
        name="st", backend=Backend.HOST_GW, ingress_hook=IngressHook.TC, stock=1
    )
    assert AgentClusterSpec.from_state(spec.to_state()) == spec
    node = LabNode(
        index=1,
        netns="fxlab-st-n1",
        dataplane=Dataplane.FLANNELD,
        public_ip=IPv4Address("192.0.2.2"),
        underlay_prefixlen=24,
        outside_ip=None,
        switch_port="n1",
        bpffs="/sys/fs/bpf/fxlab-st-n1",
        dir="/run/x/n1",
        pods_wanted=1,
        pid=42,
        subnet=IPv4Network("198.18.7.0/24"),
        mtu=1500,
        pods=[
            Pod(
                netns="fxlab-st-n1-p0",
                node=1,
                index=0,
                ip=IPv4Address("198.18.7.2"),
                gateway=IPv4Address("198.18.7.1"),
                prefixlen=24,
                mtu=1500,
                host_veth="veth0",
            )
        ],
    )
    assert LabNode.from_state(node.to_state()) == node
    assert node.gateway == IPv4Address("198.18.7.1")
    assert node.tunnel_ip == IPv4Address("198.18.7.0")


def test_subnet_file_is_read_only_when_complete(tmp_path):
    path = tmp_path / "subnet.env"
    assert agents.read_subnet_file(str(path)) is None
    path.write_text("FLANNEL_SUBNET=198.18.3.1/24\n")  # a leftover without the rest
    assert agents.read_subnet_file(str(path)) is None
    path.write_text(
        "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.3.1/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    )
    got = agents.read_subnet_file(str(path))
    assert got == agents.SubnetFile(
        network=IPv4Network("198.18.0.0/16"),
        subnet=IPv4Network("198.18.3.0/24"),
        gateway=IPv4Interface("198.18.3.1/24"),
        mtu=1450,
        ip_masq=True,
    )


# One lab node's agent arguments, as AgentCluster passes them.
NODE_ARGS = {
    "endpoint": "unix:///run/x/etcd.sock:1",
    "etcd_prefix": "/coreos.com/network",
    "bpffs": "/sys/fs/bpf/p-n0",
    "subnet_file": "/run/x/n0/subnet.env",
}


def test_agent_argv_uses_flanneld_flags():
    argv = agents.agent_argv(**NODE_ARGS, ingress_hook="xdp", ip_masq=True)
    joined = " ".join(argv)
    for flag in (
        "agent --etcd-endpoints unix:///run/x/etcd.sock:1",
        "--iface eth0",
        "--bpffs /sys/fs/bpf/p-n0",
        "--subnet-file /run/x/n0/subnet.env",
        "--healthz-port 8081",
        "--metrics-port 9100",
        "--ip-masq",
    ):
        assert flag in joined
    assert "fast-path" not in joined  # the agent's default
    argv = agents.agent_argv(**NODE_ARGS, ingress_hook="xdp", ip_masq=False, fast_path="off")
    assert "--fast-path off" in " ".join(argv)


def test_agent_argv_runs_the_release_given_with_its_own_fast_path_flags():
    common = {
        **NODE_ARGS,
        "ingress_hook": "kernel",
        "ip_masq": False,
        "fast_path": "on",
        "tcp_fast_path": True,
    }
    this = agents.agent_argv(**common)
    assert this[0] == agents.THIS_RELEASE.python
    assert "--fast-path on --tcp-fast-path" in " ".join(this)
    older = agents.AgentRelease(
        python="/tmp/r/venv/bin/python", fast_path_args=("--udp-fast-path",)
    )
    argv = agents.agent_argv(**common, release=older)
    assert argv[:4] == ["/tmp/r/venv/bin/python", "-m", "flannel_xdp.cli", "agent"]
    assert "--udp-fast-path" in argv
    assert "--fast-path" not in argv and "--tcp-fast-path" not in argv
    off = agents.AgentRelease(python="/tmp/r/venv/bin/python", fast_path_args=())
    assert "fast-path" not in " ".join(agents.agent_argv(**common, release=off))


def test_the_previous_release_wheel_is_kept_as_released():
    wheel = release_support.require_wheel(release_support.PREVIOUS_RELEASE)
    assert wheel.name.startswith(f"flannel_xdp-{release_support.PREVIOUS_RELEASE.version}-")


def test_a_release_wheel_missing_or_altered_fails_saying_so():
    missing = release_support.Release("0.0.0", "0" * 64)
    with pytest.raises(pytest.fail.Exception, match=r"missing: scripts/release-wheel.sh v0.0.0"):
        release_support.require_wheel(missing)
    altered = release_support.Release(release_support.PREVIOUS_RELEASE.version, "0" * 64)
    with pytest.raises(pytest.fail.Exception, match=r"not the released 0{64}"):
        release_support.require_wheel(altered)


def test_ping_summary_parsing():
    out = (
        "--- 198.18.1.2 ping statistics ---\n"
        "300 packets transmitted, 297 received, 1% packet loss, time 2990ms\n"
        "rtt min/avg/max/mdev = 0.041/0.093/0.310/0.020 ms\n"
    )
    r = traffic.parse_ping(out)
    assert (r.sent, r.received, r.lost, r.ok, r.rtt_avg_ms) == (300, 297, 3, False, 0.093)
    assert not traffic.parse_ping("connect: Network is unreachable").ok


def test_demo_table_and_rates():
    text = demo.table(["a", "b"], [["x", "1"], ["yyy", "22"]], right=[1])
    assert text.splitlines() == ["  a     b", "  ---  --", "  x     1", "  yyy  22"]
    assert demo.rate(9.5e9) == "9.50 Gbit/s"
    assert demo.rate(250e6) == "250 Mbit/s"
    assert demo.rate(None) == "-"


def test_demo_spec_from_arguments():
    args = argparse.Namespace(
        name="demo",
        nodes=3,
        pods=2,
        backend="vxlan",
        direct_routing=False,
        stock=1,
        ingress_hook="tc",
        fast_path=None,
        tcp_fast_path=False,
    )
    spec = demo.build_spec(args)
    assert spec.detach and spec.stock == 1 and spec.ingress_hook is IngressHook.TC
    assert spec.fast_path is None  # the agents run their default
    args.ingress_hook, args.fast_path, args.tcp_fast_path = "kernel", "off", True
    spec = demo.build_spec(args)
    assert spec.fast_path is Mode.OFF and spec.tcp_fast_path
    with pytest.raises(LabError, match="--tcp-fast-path contradicts --fast-path off"):
        spec.validate()


@pytest.mark.parametrize(
    ("backend", "hook"),
    [
        (Backend.HOST_GW, IngressHook.XDP),
        (Backend.VXLAN, IngressHook.XDP),
        (Backend.VXLAN, IngressHook.TC),
    ],
)
def test_where_the_udp_fast_path_fits(backend, hook):
    spec = AgentClusterSpec(name="unit", backend=backend, ingress_hook=hook, fast_path=Mode.ON)
    with pytest.raises(LabError, match="--fast-path on: the fast path fits a vxlan network"):
        spec.validate()
    # auto (the default) runs the stack path there instead: the agent says why
    AgentClusterSpec(name="unit", backend=backend, ingress_hook=hook).validate()
    for backend, hook in [
        (Backend.VXLAN, IngressHook.KERNEL),
        (Backend.HOST_GW, IngressHook.TC),
        (Backend.HOST_GW, IngressHook.KERNEL),
    ]:
        AgentClusterSpec(
            name="unit", backend=backend, ingress_hook=hook, fast_path=Mode.ON
        ).validate()
    args = cli.build_parser().parse_args(["lab", "up", "--udp-fast-path"])
    assert args.fast_path == "on"  # the alias
    assert cli.build_parser().parse_args(["lab", "up"]).fast_path is None


def test_the_lab_runs_the_agents_default_fast_path():
    assert DEFAULT_MODE is Mode.AUTO
    assert AgentClusterSpec(name="unit").fast_path is None
    state = AgentClusterSpec(name="unit", fast_path=Mode.OFF).to_state()
    assert AgentClusterSpec.from_state(state).fast_path is Mode.OFF
    assert AgentClusterSpec.from_state(AgentClusterSpec(name="unit").to_state()).fast_path is None


def test_the_tcp_fast_path_is_part_of_the_udp_one():
    AgentClusterSpec(name="unit", tcp_fast_path=True).validate()
    with pytest.raises(ValueError, match="the TCP fast path is part of the UDP fast path"):
        datapath.DataPathConfig(underlay="eth0", tcp_fast_path=True)


def test_the_kube_lab_runs_the_daemonset_as_the_manifest_states_it():
    pod = kubelab.daemonset_pod()
    assert pod.command == ("flannel-xdp", "agent")
    assert "--kube-subnet-mgr" in pod.args
    assert pod.port_arg("--healthz-port") == 8081 and pod.port_arg("--metrics-port") == 9465
    assert pod.env_from_fields == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "NODE_NAME": "spec.nodeName",
    }
    by_path = {m.path: m for m in pod.mounts}
    assert by_path["/run/flannel"].host_path == "/run/flannel"
    assert by_path["/etc/kube-flannel"].config_map == "kube-flannel-xdp-cfg"
    assert by_path["/sys/fs/bpf"].host_path == "/sys/fs/bpf"
    box = kubelab.PodSandbox(pod, "n1", "/run/x/n1", "/sys/fs/bpf/fxlab-x-n1", 6443)
    assert box.host_path("/sys/fs/bpf") == "/sys/fs/bpf/fxlab-x-n1"
    assert box.host_path("/run/flannel") == "/run/x/n1/host/run/flannel"
    assert box.host_path("/lib/modules") == "/lib/modules"
    env = box.env()
    assert env["NODE_NAME"] == "n1" and env["POD_NAMESPACE"] == "kube-flannel"
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "6443")
    script = box.mount_script()
    # the new /run is moved into place last: every source below the old one is mounted by then
    assert script.rstrip().endswith("/run/x/n1/pod/run /run")
    assert "/run/x/n1/pod/run/secrets/kubernetes.io/serviceaccount" in script


def test_the_kube_lab_hands_out_pod_cidrs_in_node_order():
    net = IPv4Network("198.18.0.0/16")
    assert [str(kubelab.pod_cidr(net, i)) for i in (0, 1, 255)] == [
        "198.18.0.0/24",
        "198.18.1.0/24",
        "198.18.255.0/24",
    ]
