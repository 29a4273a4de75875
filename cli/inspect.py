"""`flannel-xdp inspect`: the node's data path at a glance, from the pins (and bpftool)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from flannel_xdp.loader import libbpf
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.maps.layout import Reason, reason_label, reason_verdict
from flannel_xdp.maps.views import (
    LocalPodsMap,
    NodeConfigMap,
    ReasonsMap,
    SubnetsMap,
    TrafficMap,
)


class InspectError(RuntimeError):
    pass


@dataclass
class Report:
    bpffs: str
    node: dict[str, Any] | None
    peers: list[dict[str, Any]]
    programs: list[dict[str, Any]]
    traffic: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[dict[str, Any]] = field(default_factory=list)
    local_pods: list[dict[str, Any]] = field(default_factory=list)
    # tcx links, which `bpftool net` lists only from bpftool 7.3 on
    links: list[dict[str, Any]] = field(default_factory=list)


def _bpftool(*args: str) -> Any:
    try:
        res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"error": str(getattr(exc, "stderr", "") or exc).strip()}
    return json.loads(res.stdout)


def reason_rows(by_label: dict[tuple[str, str], tuple[int, int]]) -> list[dict[str, Any]]:
    """The reasons counters with packets, labelled as the metrics label them."""
    return [
        {
            "backend": backend,
            "verdict": reason_verdict(Reason[name]),
            "reason": reason_label(Reason[name]),
            "packets": packets,
            "bytes": octets,
        }
        for (backend, name), (packets, octets) in by_label.items()
        if packets
    ]


def collect(bpffs: str) -> Report:
    pins = PinDir(bpffs)
    if not os.path.isdir(pins.maps):
        raise InspectError(f"no flannel-xdp pins under {bpffs} (is the agent running here?)")
    with NodeConfigMap(pins.maps) as m:
        settings = m.read()
    with SubnetsMap(pins.maps) as m:
        peers = sorted(m.peers().values())
    with TrafficMap(pins.maps) as m:
        traffic = [
            {"backend": b, "direction": d, "packets": p, "bytes": n}
            for (b, d), (p, n) in m.by_label().items()
            if p
        ]
    with ReasonsMap(pins.maps) as m:
        reasons = reason_rows(m.by_label())
    local_pods = []
    if os.path.exists(os.path.join(pins.maps, LocalPodsMap.name)):  # pins made before it had none
        with LocalPodsMap(pins.maps) as m:
            local_pods = [
                {"ip": str(p.ip), "ifindex": p.ifindex, "mac": p.mac, "gateway_mac": p.gateway_mac}
                for p in sorted(m.pods().values(), key=lambda p: p.ip)
            ]
    programs = []
    for name in sorted(os.listdir(pins.progs)) if os.path.isdir(pins.progs) else []:
        info = _bpftool("prog", "show", "pinned", os.path.join(pins.progs, name))
        programs.append(
            {
                "pin": name,
                "id": info.get("id"),
                "name": info.get("name"),
                "loaded_at": info.get("loaded_at"),
                "error": info.get("error"),
            }
        )
    links = (
        [_link(pins, name) for name in sorted(os.listdir(pins.links))]
        if os.path.isdir(pins.links)
        else []
    )
    node = None
    if settings is not None:
        node = {k: str(v) for k, v in asdict(settings).items()}
    return Report(
        bpffs=bpffs,
        node=node,
        peers=[
            {
                "subnet": str(p.subnet),
                "public_ip": str(p.public_ip),
                "vtep_mac": p.vtep_mac,
                "backend": str(p.backend),
            }
            for p in peers
        ],
        programs=programs,
        traffic=traffic,
        reasons=reasons,
        local_pods=local_pods,
        links=links,
    )


def _link(pins: PinDir, name: str) -> dict[str, Any]:
    fd = libbpf.obj_get(pins.link(name))
    try:
        info = libbpf.link_info(fd)
    finally:
        os.close(fd)
    return {
        "pin": name,
        "id": info.id,
        "ifindex": info.tcx_ifindex,  # 0: its interface is gone
        "direction": "egress" if info.tcx_attach_type == libbpf.BPF_TCX_EGRESS else "ingress",
        "program_id": info.prog_id,
        "program": libbpf.prog_name_by_id(info.prog_id),
    }


def render(r: Report) -> str:
    lines = [f"flannel-xdp data path pinned under {r.bpffs}", ""]
    if r.node:
        n = r.node
        lines += [
            f"node:     subnet {n['subnet']}  public IP {n['public_ip']}  VtepMAC {n['vtep_mac']}",
            f"          VNI {n['vni']}  port {n['vxlan_port']}  ifindex underlay "
            f"{n['underlay_ifindex']} tunnel {n['tunnel_ifindex']}",
        ]
        if n["tcp_fast_path"] == "True":
            lines.append("          TCP fast path on (conntrack leaves TCP windows unchecked)")
    else:
        lines.append("node:     not configured")
    lines += ["", f"peers ({len(r.peers)}):"]
    lines += [
        f"  {p['subnet']:<20} via {p['public_ip']:<16} {p['backend']:<8} {p['vtep_mac']}"
        for p in r.peers
    ] or ["  none"]
    lines += ["", "programs:"]
    lines += [f"  {p['pin']:<16} id {p['id']}  {p['name'] or p['error']}" for p in r.programs]
    if r.links:
        lines += ["", "tcx links (bpftool link show pinned <bpffs>/links/<pin>):"]
        lines += [
            f"  {x['pin']:<24} tcx {x['direction']:<7} ifindex {x['ifindex']:<6} "
            f"program id {x['program_id']}  {x['program']}"
            for x in r.links
        ]
    lines += ["", "traffic:"]
    lines += [
        f"  {t['backend']:<8} {t['direction']:<9} {t['packets']:>12} pkts {t['bytes']:>15} B"
        for t in r.traffic
    ] or ["  none yet"]
    if r.local_pods:
        lines += ["", "local pods (fast path: sent from and delivered into their netns):"]
        lines += [
            f"  {p['ip']:<16} ifindex {p['ifindex']:<6} {p['mac']} via {p['gateway_mac']}"
            for p in r.local_pods
        ]
    lines += ["", "not forwarded by the data path (pass = to the stack, drop = dropped):"]
    lines += [
        f"  {x['verdict']:<4} {x['reason']:<24} {x['packets']:>12} pkts  ({x['backend']})"
        for x in r.reasons
    ] or ["  none"]
    return "\n".join(lines)


def run(bpffs: str, as_json: bool) -> int:
    report = collect(bpffs)
    print(json.dumps(asdict(report), indent=2) if as_json else render(report))
    return 0
