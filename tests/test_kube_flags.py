"""`flannel-xdp agent --kube-subnet-mgr` and flanneld's kube flags (and their env)."""

from __future__ import annotations

import argparse

import pytest

from flannel_xdp.agent import flags
from flannel_xdp.agent.agent import registry_for
from flannel_xdp.registry.etcd import EtcdRegistry
from flannel_xdp.registry.kube import KubeRegistry

pytestmark = pytest.mark.unit


def parse(*argv: str):
    p = argparse.ArgumentParser()
    flags.add_arguments(p)
    return flags.options_from(p.parse_args(argv))


def test_etcd_by_default(monkeypatch) -> None:
    opts = parse()
    assert opts.kube is None
    assert isinstance(registry_for(opts), EtcdRegistry)


def test_kube_flags(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("NODE_NAME", "n1")
    cfg = tmp_path / "kubeconfig"
    cfg.write_text("{}")
    opts = parse(
        "--kube-subnet-mgr",
        f"--kubeconfig-file={cfg}",
        "--kube-api-url=https://127.0.0.1:6443",
        "--kube-annotation-prefix=example.org",
        "--net-config-path=/tmp/net-conf.json",
        "--set-node-network-unavailable=false",
    )
    k = opts.kube
    assert k is not None
    assert (k.node_name, k.kubeconfig_file, k.api_url) == ("n1", str(cfg), "https://127.0.0.1:6443")
    assert (k.annotation_prefix, k.net_config_path) == ("example.org", "/tmp/net-conf.json")
    assert k.set_node_network_unavailable is False
    reg = registry_for(opts)
    assert isinstance(reg, KubeRegistry)
    assert reg.names.public_ip == "example.org/public-ip"


def test_kube_flags_from_env(monkeypatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.setenv("POD_NAME", "p")
    monkeypatch.setenv("POD_NAMESPACE", "kube-flannel")
    monkeypatch.setenv("FLANNELD_KUBE_SUBNET_MGR", "true")
    monkeypatch.setenv("FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", "false")
    monkeypatch.setenv("FLANNELD_NET_CONFIG_PATH", "/x.json")
    opts = parse()
    assert opts.kube is not None
    assert (opts.kube.pod_name, opts.kube.pod_namespace) == ("p", "kube-flannel")
    assert opts.kube.set_node_network_unavailable is False
    assert opts.kube.net_config_path == "/x.json"
    assert opts.kube.set_node_network_unavailable is False


def test_kube_needs_a_node_name(monkeypatch) -> None:
    for name in ("NODE_NAME", "POD_NAME", "POD_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="NODE_NAME"):
        parse("--kube-subnet-mgr")


def test_kube_api_url_overrides_the_kubeconfig_server(tmp_path) -> None:
    from flannel_xdp.lab.kube import kubeconfig_text
    from flannel_xdp.registry.kube import KubeSettings, kube_config

    path = tmp_path / "kubeconfig"
    path.write_text(kubeconfig_text("https://127.0.0.1:1", "/ca.crt", token="t0k"))
    cfg = kube_config(KubeSettings(kubeconfig_file=str(path), api_url="https://127.0.0.1:2"))
    single = cfg.get()
    assert single.cluster.server == "https://127.0.0.1:2"
    assert single.user.token == "t0k"
    assert kube_config(KubeSettings(kubeconfig_file=str(path))).get().cluster.server == (
        "https://127.0.0.1:1"
    )
    only_url = kube_config(KubeSettings(api_url="http://127.0.0.1:3")).get()
    assert only_url.cluster.server == "http://127.0.0.1:3"
