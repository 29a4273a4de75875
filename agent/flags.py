"""`flannel-xdp agent`: flanneld's flag names and defaults, each also as FLANNELD_<NAME>."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from ipaddress import IPv4Address, ip_address

from flannel_xdp import defaults
from flannel_xdp.agent import privileges
from flannel_xdp.loader import fast_path
from flannel_xdp.loader.bpffs import BpffsError, PinDir
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.maps.views import SubnetsMap
from flannel_xdp.node import conntrack
from flannel_xdp.node.subnet_env import DEFAULT_PATH as DEFAULT_SUBNET_FILE
from flannel_xdp.registry.etcd import DEFAULT_ENDPOINTS, DEFAULT_PREFIX, TlsFiles, parse_endpoints
from flannel_xdp.registry.kube import DEFAULT_NET_CONFIG_PATH, KubeSettings
from flannel_xdp.registry.kube_annotations import DEFAULT_PREFIX as DEFAULT_ANNOTATION_PREFIX

log = logging.getLogger(__name__)

ENV_PREFIX = "FLANNELD_"
EXIT_CONFIG = 2  # bad flags, network config or node set-up: nothing was changed
AUTO = "auto"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _env_default(flag: str, default):
    value = os.environ.get(_env_name(flag))
    if value is None:
        return default
    if isinstance(default, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, list):
        return [v for v in value.split(",") if v]
    return value


def _go_bool(text: str) -> bool:
    """Go's strconv.ParseBool, as flanneld's --flag=false."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    def flag(name: str, default, help: str, **kw) -> None:
        env_default = _env_default(name, default)
        extra = f" (env {_env_name(name)}; default: {default!r})"
        if isinstance(default, bool):
            p.add_argument(name, action="store_true", default=env_default, help=help + extra)
        elif isinstance(default, list):
            p.add_argument(name, action="append", default=None, help=help + extra, **kw)
            p.set_defaults(**{name.lstrip("-").replace("-", "_") + "_env": env_default})
        else:
            p.add_argument(name, default=env_default, help=help + extra, **kw)

    flag("--etcd-endpoints", DEFAULT_ENDPOINTS, "comma-separated etcd endpoints")
    flag("--etcd-prefix", DEFAULT_PREFIX, "etcd prefix of the network config and leases")
    flag("--etcd-cafile", "", "CA file for etcd TLS")
    flag("--etcd-certfile", "", "client certificate for etcd TLS")
    flag("--etcd-keyfile", "", "client key for etcd TLS")
    flag("--etcd-username", "", "etcd user name")
    flag("--etcd-password", "", "etcd password")
    flag("--iface", [], "underlay interface, by name or IP (repeatable: first that exists)")
    flag("--iface-regex", [], "regex matching the underlay interface name (repeatable)")
    flag("--public-ip", "", "IP other nodes reach this one at (default: the interface's)")
    flag("--subnet-file", DEFAULT_SUBNET_FILE, "where to write subnet.env for the CNI plugin")
    flag(
        "--subnet-lease-renew-margin",
        60,
        "renew the lease this many minutes before expiry",
        type=int,
    )
    flag("--ip-masq", False, "masquerade pod traffic leaving the cluster network")
    flag("--healthz-ip", "0.0.0.0", "address of the /healthz and /readyz server")
    flag("--healthz-port", 0, "port of the health server (0: off)", type=int)
    flag("--bpffs", defaults.BPFFS_DIR, "bpffs directory for pinned programs and maps")
    flag("--metrics-ip", "0.0.0.0", "address of the Prometheus endpoint")
    flag("--metrics-port", 0, "port of the Prometheus endpoint (0: off)", type=int)
    flag(
        "--ingress-hook",
        AUTO,
        "where VXLAN from the wire is judged and decapsulated: xdp (XDP judges and "
        "decapsulates), tc (tc ingress does both) or kernel (tc ingress judges, the "
        "kernel's vxlan device decapsulates); auto picks kernel for vxlan and tc for "
        "host-gw networks, as make bench measured",
        choices=[AUTO, *(h.value for h in IngressHook)],
    )
    flag("--xdp-mode", "auto", "XDP attach mode", choices=["auto", "native", "generic"])
    flag(
        "--fast-path",
        defaults.FAST_PATH,
        "send and deliver pod traffic of flows that conntrack has confirmed un-NATed "
        "straight between the pods' veth ends and the underlay, skipping the node's routing "
        "and netfilter pass (docs/fast-path.md): auto where the network's backend and "
        "ingress hook have a build of it and the kernel has the conntrack kfuncs and tcx "
        "(elsewhere the stack path, and the log and flannel_xdp_fast_path_off say why); on "
        "makes a missing part an error (exit 2); off never. TCP takes it where the agent "
        "can mark its flows in conntrack (ctnetlink and conntrack's events in the node's "
        "network namespace; window checks stay on for every other flow)",
        choices=[m.value for m in fast_path.Mode],
    )
    flag("--udp-fast-path", False, "the same as --fast-path on")
    flag(
        "--tcp-fast-path",
        False,
        "--fast-path on, and TCP required too: exit 2 unless the agent can mark TCP flows "
        "in conntrack (ctnetlink, conntrack's events) in the node's network namespace",
    )
    flag("--max-subnets", defaults.MAX_SUBNETS, "capacity of the remote subnets map", type=int)
    flag(
        "--build-cache",
        defaults.BUILD_CACHE_DIR,
        "directory where each compile of a program saves its bytecode, so that later "
        "starts keep or load it rather than compile it again (empty: compile at every start)",
    )
    # flanneld's kube subnet manager (docs/kubernetes.md)
    flag(
        "--kube-subnet-mgr",
        False,
        "take the network config from --net-config-path and this node's subnet from its "
        "podCIDR, and publish the lease as node annotations (instead of etcd)",
    )
    flag("--kube-api-url", "", "Kubernetes API server URL (overrides the kubeconfig's)")
    flag(
        "--kubeconfig-file",
        "",
        "kubeconfig file (with --kube-api-url empty too: the in-cluster service account)",
    )
    flag("--kube-annotation-prefix", DEFAULT_ANNOTATION_PREFIX, "prefix of the node annotations")
    flag("--net-config-path", DEFAULT_NET_CONFIG_PATH, "network config file (kube mode)")
    name = "--set-node-network-unavailable"
    env = os.environ.get(_env_name(name))
    p.add_argument(
        name,
        type=_go_bool,
        nargs="?",
        const=True,
        default=True if env is None else _go_bool(env),
        metavar="BOOL",
        help="set the node's NetworkUnavailable condition to False once the lease is "
        f"published (kube mode; env {_env_name(name)}; default: True)",
    )


def wanted_fast_path(args: argparse.Namespace) -> fast_path.Wanted:
    """--fast-path, with --udp-fast-path and --tcp-fast-path as its aliases."""
    Mode = fast_path.Mode
    try:
        mode = Mode(args.fast_path)
    except ValueError:
        raise ValueError(
            f"--fast-path: {args.fast_path!r}; choose {', '.join(m.value for m in Mode)}"
        ) from None
    given = {"--udp-fast-path": args.udp_fast_path, "--tcp-fast-path": args.tcp_fast_path}
    aliases = [name for name, on in given.items() if on]
    if mode is Mode.OFF:
        if aliases:
            raise ValueError(f"{aliases[0]} contradicts --fast-path off")
        return fast_path.Wanted(Mode.OFF, Mode.OFF)
    udp = Mode.ON if aliases else mode
    return fast_path.Wanted(udp, Mode.ON if args.tcp_fast_path else Mode.AUTO)


def options_from(args: argparse.Namespace):
    """AgentOptions from parsed flags; ValueError names the bad flag."""
    from flannel_xdp.agent.agent import AgentOptions

    try:
        endpoints = parse_endpoints(args.etcd_endpoints)
    except ValueError as exc:
        raise ValueError(f"--etcd-endpoints: {exc}") from exc
    tls_files = (args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile)
    for name, path in zip(
        ("--etcd-cafile", "--etcd-certfile", "--etcd-keyfile"), tls_files, strict=True
    ):
        if path and not os.path.isfile(path):
            raise ValueError(f"{name}: no such file: {path}")
    tls = TlsFiles(*(p or None for p in tls_files)) if any(tls_files) else None
    if any(e.tls for e in endpoints) and tls is None:
        tls = TlsFiles()
    try:
        public_ip = IPv4Address(args.public_ip) if args.public_ip else None
    except ValueError as exc:
        raise ValueError(f"--public-ip: {exc}") from exc
    for name, port in (
        ("--healthz-port", args.healthz_port),
        ("--metrics-port", args.metrics_port),
    ):
        if not 0 <= port <= 65535:
            raise ValueError(f"{name}: {port} is not a port")
    for name, addr in (("--healthz-ip", args.healthz_ip), ("--metrics-ip", args.metrics_ip)):
        try:
            ip_address(addr)
        except ValueError as exc:
            raise ValueError(f"{name}: {addr!r} is not an IP address to listen on") from exc
    if args.subnet_lease_renew_margin < 1:
        raise ValueError("--subnet-lease-renew-margin: must be at least 1 minute")
    if not 1 <= args.max_subnets <= 1 << 24:
        raise ValueError(f"--max-subnets: must be 1..16777216, not {args.max_subnets}")
    if args.build_cache and not os.path.isabs(args.build_cache):
        raise ValueError(f"--build-cache: {args.build_cache!r} is not an absolute path")
    kube = None
    if args.kube_subnet_mgr:
        if not args.kube_annotation_prefix.strip("/"):
            raise ValueError("--kube-annotation-prefix: must not be empty")
        kube = KubeSettings.from_env(
            api_url=args.kube_api_url,
            kubeconfig_file=args.kubeconfig_file,
            annotation_prefix=args.kube_annotation_prefix.strip("/"),
            net_config_path=args.net_config_path,
            set_node_network_unavailable=args.set_node_network_unavailable,
        )
        if args.kubeconfig_file and not os.path.isfile(args.kubeconfig_file):
            raise ValueError(f"--kubeconfig-file: no such file: {args.kubeconfig_file}")
        if not (kube.node_name or (kube.pod_name and kube.pod_namespace)):
            raise ValueError("--kube-subnet-mgr: set NODE_NAME, or POD_NAME and POD_NAMESPACE")
    return AgentOptions(
        kube=kube,
        etcd_endpoints=endpoints,
        etcd_prefix=args.etcd_prefix,
        tls=tls,
        etcd_username=args.etcd_username or None,
        etcd_password=args.etcd_password or None,
        ifaces=args.iface if args.iface is not None else args.iface_env,
        iface_regex=args.iface_regex if args.iface_regex is not None else args.iface_regex_env,
        public_ip=public_ip,
        subnet_file=args.subnet_file,
        renew_margin_minutes=args.subnet_lease_renew_margin,
        ip_masq=args.ip_masq,
        healthz_ip=args.healthz_ip,
        healthz_port=args.healthz_port,
        metrics_ip=args.metrics_ip,
        metrics_port=args.metrics_port,
        bpffs=args.bpffs,
        ingress_hook=None if args.ingress_hook == AUTO else IngressHook(args.ingress_hook),
        xdp_mode=args.xdp_mode,
        fast_path=wanted_fast_path(args),
        max_subnets=args.max_subnets,
        build_cache=args.build_cache,
    )


def preflight(opts) -> str | None:
    """What stops the agent from running on this node, found before it touches anything
    (etcd included): missing capabilities, a --bpffs that cannot hold pins. The interface
    and the network config are checked by the agent before it takes a lease."""
    if (problem := privileges.problem()) is not None:
        return problem
    if opts.fast_path.udp is fast_path.Mode.ON:
        try:
            lacks = fast_path.kernel_lacks()
        except ValueError as exc:
            return str(exc)
        if lacks:
            return f"--fast-path on: {'; '.join(lacks.values())}"
    tcp_problem = conntrack.tcp_fast_path_problem()
    if opts.fast_path.tcp is fast_path.Mode.ON and tcp_problem is not None:
        return f"--tcp-fast-path: {tcp_problem}"
    pins = PinDir(opts.bpffs)
    try:
        pins.check()
    except BpffsError as exc:
        return str(exc)
    if os.path.exists(os.path.join(pins.maps, SubnetsMap.name)):
        # A restart with another --max-subnets replaces the pinned map (loader/map_upgrades.py),
        # but it cannot drop the peers the running data path holds.
        with SubnetsMap(pins.maps) as pinned:
            held = sum(1 for _ in pinned.iter_keys())
            if held > opts.max_subnets:
                return (
                    f"--max-subnets {opts.max_subnets} is below the {held} remote subnets "
                    f"the pinned map {pinned.path} holds; raise it (or run `flannel-xdp "
                    "teardown` first)"
                )
    return None


def run(args: argparse.Namespace) -> int:
    from flannel_xdp.agent.agent import Agent

    try:
        opts = options_from(args)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    if (problem := preflight(opts)) is not None:
        log.error("%s", problem)
        return EXIT_CONFIG
    return asyncio.run(Agent(opts).run())
