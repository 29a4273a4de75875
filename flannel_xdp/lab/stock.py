"""A stock flanneld node for mixed labs: `python -m flannel_xdp.lab.stock` in a node's netns.

Not flanneld itself (the machine has no flanneld binary), but what a flanneld v0.28
node does to the registry and to the kernel, from the same etcd and with the same
flag names: it takes a lease in flanneld's order and format (the agent's acquire and
registry code, byte-compatible with flanneld), makes the kernel vxlan device
``flannel.<VNI>`` with a random VtepMAC, writes subnet.env, installs the ip-masq
rules, then lists and watches the leases and programs each remote one exactly as
flanneld does (flannel_xdp.lab.flanneld): neighbour, FDB entry and onlink route for
vxlan; a route via the peer's public IP for host-gw and for DirectRouting peers on
the same network. A removed lease takes its entries with it; if its own lease is
deleted it exits, as flanneld does ("Lease has been revoked").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from ipaddress import IPv4Network

from pyroute2 import IPRoute

from flannel_xdp import defaults
from flannel_xdp.agent import acquire, masq, subnet_env
from flannel_xdp.agent.agent import random_vtep_mac
from flannel_xdp.agent.config import ConfigError, NetworkConfig
from flannel_xdp.agent.interface import Underlay, find_underlay
from flannel_xdp.agent.lease import LeaseAttrs
from flannel_xdp.agent.peers import Ignored, peer_for
from flannel_xdp.agent.registry import (
    Compacted,
    EtcdRegistry,
    EventKind,
    RegistryError,
    parse_endpoints,
)
from flannel_xdp.lab import flanneld
from flannel_xdp.maps.layout import Backend
from flannel_xdp.maps.views import Peer

log = logging.getLogger("flanneld-stock")

LEASE_TTL = 24 * 3600
RETRY = 0.5


class Revoked(Exception):
    pass


def _existing_mac(vni: int) -> str | None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=defaults.TUNNEL_DEVICE_FORMAT.format(vni=vni))
        return ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS") if found else None


class StockNode:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.registry = EtcdRegistry(parse_endpoints(args.etcd_endpoints), prefix=args.etcd_prefix)
        self.config: NetworkConfig | None = None
        self.underlay: Underlay | None = None
        self.subnet: IPv4Network | None = None
        self.attrs: LeaseAttrs | None = None
        self.programmed: dict[IPv4Network, Peer] = {}

    # -- programming, in flanneld's shape ----------------------------------------------------

    def _add(self, peer: Peer) -> None:
        assert self.config and self.underlay
        if peer.backend is Backend.HOST_GW:  # host-gw, or vxlan DirectRouting on-link
            flanneld.add_host_gw_route(peer, self.underlay.name)
        else:
            flanneld.add_vxlan_peer(peer, self.config.backend.vxlan.vni)

    def _remove(self, peer: Peer) -> None:
        assert self.config and self.underlay
        if peer.backend is Backend.HOST_GW:
            flanneld.remove_host_gw_route(peer, self.underlay.name)
        else:
            flanneld.remove_vxlan_peer(peer, self.config.backend.vxlan.vni)

    async def _apply(self, subnet: IPv4Network, attrs: LeaseAttrs | None) -> None:
        """Make one remote subnet's kernel state match its lease (None: removed)."""
        assert self.config and self.underlay and self.attrs
        if subnet == self.subnet:
            if attrs is None or attrs.public_ip != self.attrs.public_ip:
                raise Revoked(f"Lease has been revoked: {subnet}")
            return
        want = None
        if attrs is not None:
            got = peer_for(subnet, attrs, self.config, [self.underlay.network])
            if isinstance(got, Ignored):
                log.warning("ignoring lease %s: %s", subnet, got.why)
            else:
                want = got
        old = self.programmed.get(subnet)
        if old == want:
            return
        if old is not None:
            await asyncio.to_thread(self._remove, old)
            del self.programmed[subnet]
            log.info("removed %s", subnet)
        if want is not None:
            await asyncio.to_thread(self._add, want)
            self.programmed[subnet] = want
            how = "route" if want.backend is Backend.HOST_GW else "vxlan"
            log.info("added %s via %s (%s)", subnet, want.public_ip, how)

    async def _sync(self) -> int:
        listing = await self.registry.list_leases()
        for subnet, attrs in listing.leases.items():
            await self._apply(subnet, attrs)
        if self.subnet not in listing.leases:
            raise Revoked(f"Lease has been revoked: {self.subnet}")
        for subnet in [s for s in self.programmed if s not in listing.leases]:
            await self._apply(subnet, None)
        return listing.revision

    # -- the node --------------------------------------------------------------------------

    async def start(self) -> None:
        a = self.args
        while True:
            try:
                self.config = config = await self.registry.get_config()
                break
            except RegistryError as exc:
                log.warning("waiting for the network config: %s", exc)
                await asyncio.sleep(RETRY)
        self.underlay = underlay = await asyncio.to_thread(find_underlay, a.iface, [])
        public_ip = underlay.address.ip
        vni = config.backend.vxlan.vni
        vxlan = config.backend.type == "vxlan"
        if vxlan:
            mac = await asyncio.to_thread(_existing_mac, vni) or random_vtep_mac()
            self.attrs = LeaseAttrs(public_ip, "vxlan", vni=vni, vtep_mac=mac)
        elif config.backend.type == "host-gw":
            self.attrs = LeaseAttrs(public_ip, "host-gw")
        else:
            raise SystemExit(f"backend {config.backend.type} is not simulated here")
        previous = subnet_env.read_subnet(a.subnet_file)
        self.subnet = await acquire.acquire(
            self.registry, config, self.attrs, LEASE_TTL, previous=previous
        )
        mtu = underlay.mtu - defaults.VXLAN_OVERHEAD if vxlan else underlay.mtu
        if vxlan:
            await asyncio.to_thread(
                flanneld.ensure_vxlan_device,
                public_ip,
                self.subnet,
                self.attrs.vtep_mac,
                mtu,
                underlay.name,
                vni,
                config.backend.vxlan.port,
            )
        subnet_env.write(
            a.subnet_file, subnet_env.SubnetEnv(config.network, self.subnet, mtu, a.ip_masq)
        )
        await asyncio.to_thread(masq.install, config.network, self.subnet, a.ip_masq)
        log.info("lease %s, backend %s, wrote %s", self.subnet, config.backend.type, a.subnet_file)

    async def run(self) -> int:
        try:
            await self.start()
            revision = await self._sync()
            log.info("ready: %d peers", len(self.programmed))
            while True:
                try:
                    async for ev in self.registry.watch_leases(revision + 1):
                        revision = ev.revision
                        attrs = ev.attrs if ev.kind == EventKind.ADDED else None
                        await self._apply(ev.subnet, attrs)
                except (Compacted, RegistryError) as exc:
                    log.warning("watch broke (%s); listing again", exc)
                    await asyncio.sleep(RETRY)
                    try:
                        revision = await self._sync()
                    except RegistryError as again:
                        log.warning("relist failed: %s", again)
        except Revoked as exc:
            log.error("%s", exc)
            return 1
        except ConfigError as exc:
            log.error("invalid network config: %s", exc)
            return 2
        finally:
            await self.registry.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flannel_xdp.lab.stock", description=__doc__)
    p.add_argument("--etcd-endpoints", required=True)
    p.add_argument("--etcd-prefix", default="/coreos.com/network")
    p.add_argument("--iface", action="append", default=[])
    p.add_argument("--subnet-file", required=True)
    p.add_argument("--ip-masq", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(StockNode(args).run())


if __name__ == "__main__":
    sys.exit(main())
