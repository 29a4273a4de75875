"""`flannel-xdp agent` with a malformed network config in etcd: exit code 2, a message
naming the etcd key and the offending config key, and nothing made on the node.

The agent runs as a subprocess in a throwaway network namespace of its own (unshare
--net, so root): it reads the config before it touches anything, but should that
ever change, it must not attach to an interface of this host. It reaches etcd
through etcd's unix socket, which works from any network namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.etcd_support import EtcdCluster, etcd_cluster, require_root

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def etcd():
    with etcd_cluster(1, unix_socket=True) as cluster:
        yield cluster


def run_agent(etcd: EtcdCluster, prefix: str, tmp_path) -> tuple[subprocess.CompletedProcess, str]:
    require_root("the agent runs in a network namespace of its own (unshare --net)")
    bpffs = f"/sys/fs/bpf/fxdp-test-{uuid.uuid4().hex[:10]}"
    argv = [
        "unshare", "--net", "--",
        sys.executable, "-m", "flannel_xdp.cli", "agent",
        "--etcd-endpoints", etcd.members[0].endpoint,
        "--etcd-prefix", prefix,
        "--iface", "lo",
        "--bpffs", bpffs,
        "--subnet-file", str(tmp_path / "subnet.env"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    return result, bpffs


@pytest.mark.parametrize(
    ("config", "key", "detail"),
    [
        ('{"Network": "10.244.0.0/16", "SubnetLen": "24"}', "SubnetLen", "a whole number"),
        (
            '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 0}}',
            "Backend.VNI",
            "1..16777215",
        ),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "ipsec"}}', "Backend.Type", "ipsec"),
        ('{"Network": "10.244.0.0/33", "Backend": {"Type": "vxlan"}}', "Network", "10.244.0.0/33"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}', "config", "not valid JSON"),
    ],
    ids=["subnetlen-type", "vni-zero", "unknown-backend", "bad-network", "broken-json"],
)
def test_malformed_config_exits_2_naming_the_key(etcd, tmp_path, config, key, detail):
    prefix = etcd.new_prefix()
    etcd.put(f"{prefix}/config", config)
    result, bpffs = run_agent(etcd, prefix, tmp_path)
    assert result.returncode == 2, result.stderr
    line = next(
        (ln for ln in result.stderr.splitlines() if "invalid network config in etcd" in ln), ""
    )
    # names the etcd key holding the config, and the config key at fault
    assert f"{prefix}/config: {key}" in line, result.stderr
    assert detail in line, result.stderr
    assert not os.path.exists(bpffs), "the agent made its bpffs directory"
    assert not (tmp_path / "subnet.env").exists()
    assert etcd.keys(f"{prefix}/subnets/") == [], "the agent took a lease"


def test_backend_without_bpf_data_path_exits_2(etcd, tmp_path):
    prefix = etcd.new_prefix()
    etcd.put(f"{prefix}/config", json.dumps({"Network": "10.244.0.0/16"}))  # udp, as flanneld
    result, bpffs = run_agent(etcd, prefix, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "backend 'udp' has no BPF data path" in result.stderr
    assert not os.path.exists(bpffs)
    assert etcd.keys(f"{prefix}/subnets/") == []
