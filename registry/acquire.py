"""Acquiring this node's subnet lease in flanneld's order.

1. A lease whose PublicIP is ours and that fits the config is reused (one that
   does not fit is deleted). 2. The subnet of an existing subnet file is taken
   again if it is free. 3. Otherwise a random one of up to 100 free subnets,
   scanned from SubnetMin. Creation only succeeds if the key does not exist, so
   racing nodes never share a subnet; a lost race is retried, up to 10 times.
"""

from __future__ import annotations

import logging
import random
from ipaddress import IPv4Network
from typing import TYPE_CHECKING

from flannel_xdp.registry.base import NoSubnetAvailable
from flannel_xdp.registry.config import NetworkConfig
from flannel_xdp.registry.lease import LeaseAttrs

if TYPE_CHECKING:
    from flannel_xdp.registry.etcd import EtcdRegistry

log = logging.getLogger(__name__)

CANDIDATES = 100
ATTEMPTS = 10


def fits(config: NetworkConfig, subnet: IPv4Network) -> bool:
    return (
        subnet.prefixlen == config.subnet_len
        and subnet.subnet_of(config.network)
        and config.subnet_min <= subnet.network_address <= config.subnet_max
    )


def free_subnets(config: NetworkConfig, taken: set[IPv4Network], limit: int = CANDIDATES):
    out: list[IPv4Network] = []
    for subnet in config.subnets():
        if subnet not in taken:
            out.append(subnet)
            if len(out) == limit:
                break
    return out


async def acquire(
    registry: EtcdRegistry,
    config: NetworkConfig,
    attrs: LeaseAttrs,
    ttl: int,
    previous: IPv4Network | None = None,
    rng: random.Random | None = None,
) -> IPv4Network:
    rng = rng or random.SystemRandom()
    for attempt in range(1, ATTEMPTS + 1):
        listing = await registry.list_leases()
        for subnet, held in listing.leases.items():
            if held.public_ip != attrs.public_ip:
                continue
            if fits(config, subnet):
                log.info("reusing lease %s held by our public IP %s", subnet, attrs.public_ip)
                await registry.renew_lease(subnet, attrs, ttl)
                return subnet
            log.info("deleting our lease %s: it does not fit the network config", subnet)
            await registry.delete_lease(subnet)
        taken = set(listing.leases)
        reuse_previous = previous is not None and fits(config, previous) and previous not in taken
        if reuse_previous and await registry.create_lease(previous, attrs, ttl):
            log.info("took the subnet file's subnet %s again", previous)
            return previous
        candidates = free_subnets(config, taken)
        if not candidates:
            raise NoSubnetAvailable(
                f"no free subnet in {config.network} (/{config.subnet_len} from "
                f"{config.subnet_min} to {config.subnet_max}): all "
                f"{len(config.subnets())} are leased"
            )
        subnet = rng.choice(candidates)
        if await registry.create_lease(subnet, attrs, ttl):
            log.info("acquired lease %s", subnet)
            return subnet
        log.info("lease %s was taken meanwhile (attempt %d of %d)", subnet, attempt, ATTEMPTS)
    raise NoSubnetAvailable(f"gave up acquiring a subnet after {ATTEMPTS} lost races")
