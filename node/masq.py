"""flanneld's ip-masq and forward rules (iptables), installed atomically per chain.

Each chain is replaced whole with iptables-restore --noflush, so no packet ever
sees half a rule set, and only when it does not hold the rules already (a restarted
agent leaves them alone); the jumps into the chains are added once.
"""

from __future__ import annotations

import logging
import subprocess
from ipaddress import IPv4Network

log = logging.getLogger(__name__)

COMMENT = "flanneld masq"
MASQ_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = "224.0.0.0/4"


class MasqError(RuntimeError):
    pass


def masq_rules(network: IPv4Network, subnet: IPv4Network) -> list[str]:
    c = f'-m comment --comment "{COMMENT}"'
    n, s = str(network), str(subnet)
    return [
        # kube-proxy marked it for its own masquerade: do not NAT twice
        f"-A {MASQ_CHAIN} -m mark --mark {KUBE_PROXY_MARK} {c} -j RETURN",
        # pod to pod stays unNATed, in either direction
        f"-A {MASQ_CHAIN} -s {s} -d {n} {c} -j RETURN",
        f"-A {MASQ_CHAIN} -s {n} -d {s} {c} -j RETURN",
        # pods leaving the cluster network (but not to multicast) are masqueraded
        f"-A {MASQ_CHAIN} -s {n} ! -d {MULTICAST} {c} -j MASQUERADE --random-fully",
        # the host talking to pods elsewhere gets an address routable in the cluster
        f"-A {MASQ_CHAIN} ! -s {n} -d {n} {c} -j MASQUERADE --random-fully",
    ]


def forward_rules(network: IPv4Network) -> list[str]:
    c = '-m comment --comment "flanneld forward"'
    return [
        f"-A {FWD_CHAIN} -s {network} {c} -j ACCEPT",
        f"-A {FWD_CHAIN} -d {network} {c} -j ACCEPT",
    ]


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise MasqError(f"cannot run {argv[0]}: {exc}") from exc


def _holds(table: str, chain: str, rules: list[str]) -> bool:
    """Whether the chain holds exactly rules already (as `iptables -S` prints them)."""
    res = _run(["iptables", "-w", "-t", table, "-S", chain])
    if res.returncode != 0:
        return False
    return [line for line in res.stdout.splitlines() if line.startswith(f"-A {chain} ")] == rules


def _restore(table: str, chain: str, rules: list[str]) -> None:
    if _holds(table, chain, rules):  # an adopting restart: nothing to change
        return
    text = f"*{table}\n:{chain} - [0:0]\n" + "\n".join(rules) + "\nCOMMIT\n"
    res = _run(["iptables-restore", "--noflush", "-w"], stdin=text)
    if res.returncode != 0:
        raise MasqError(f"iptables-restore of {table}/{chain} failed: {res.stderr.strip()}")


def _ensure_jump(table: str, from_chain: str, to_chain: str, comment: str) -> None:
    rule = ["-m", "comment", "--comment", comment, "-j", to_chain]
    if _run(["iptables", "-w", "-t", table, "-C", from_chain, *rule]).returncode == 0:
        return
    res = _run(["iptables", "-w", "-t", table, "-I", from_chain, "1", *rule])
    if res.returncode != 0:
        raise MasqError(f"cannot add the jump {from_chain} -> {to_chain}: {res.stderr.strip()}")


def install(network: IPv4Network, subnet: IPv4Network, ip_masq: bool) -> None:
    _restore("filter", FWD_CHAIN, forward_rules(network))
    _ensure_jump("filter", "FORWARD", FWD_CHAIN, "flanneld forward")
    if ip_masq:
        _restore("nat", MASQ_CHAIN, masq_rules(network, subnet))
        _ensure_jump("nat", "POSTROUTING", MASQ_CHAIN, COMMENT)
    log.info("iptables: forward rules for %s%s", network, ", ip-masq on" if ip_masq else "")


def remove() -> None:
    for table, parent, chain, comment in (
        ("nat", "POSTROUTING", MASQ_CHAIN, COMMENT),
        ("filter", "FORWARD", FWD_CHAIN, "flanneld forward"),
    ):
        rule = ["-m", "comment", "--comment", comment, "-j", chain]
        while _run(["iptables", "-w", "-t", table, "-D", parent, *rule]).returncode == 0:
            pass
        _run(["iptables", "-w", "-t", table, "-F", chain])
        _run(["iptables", "-w", "-t", table, "-X", chain])
