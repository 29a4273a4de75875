"""The registry over TLS with client certificates, against a real etcd (loopback only)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.lab.etcd import ServerTls
from flannel_xdp.registry.etcd import EtcdRegistry, RegistryUnavailable, TlsFiles, parse_endpoints
from flannel_xdp.registry.lease import LeaseAttrs
from tests.etcd_support import etcd_cluster, require_etcd

pytestmark = pytest.mark.etcd


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: str, name: str) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all in d."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        f"/CN={name}-ca",
        "-keyout",
        f"{name}-ca.key",
        "-out",
        f"{name}-ca.crt",
        cwd=d,
    )
    for who, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}-{who}",
            "-keyout",
            f"{name}-{who}.key",
            "-out",
            f"{name}-{who}.csr",
            cwd=d,
        )
        with open(os.path.join(d, f"{name}-{who}.ext"), "w") as f:
            f.write(ext + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}-{who}.csr",
            "-CA",
            f"{name}-ca.crt",
            "-CAkey",
            f"{name}-ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            f"{name}-{who}.ext",
            "-out",
            f"{name}-{who}.crt",
            cwd=d,
        )


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[tuple[str, str]]:
    require_etcd()
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: run `make setup`")
    d = tempfile.mkdtemp(prefix="fxdp-etcd-tls-")
    try:
        make_pki(d, "good")
        make_pki(d, "other")
        tls = ServerTls(
            ca=f"{d}/good-ca.crt",
            cert=f"{d}/good-server.crt",
            key=f"{d}/good-server.key",
            client_cert=f"{d}/good-client.crt",
            client_key=f"{d}/good-client.key",
        )
        with etcd_cluster(1, tls=tls) as cluster:
            yield cluster.urls[0], d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_leases_over_tls_with_client_certificates(tls_etcd):
    url, d = tls_etcd
    tls = TlsFiles(f"{d}/good-ca.crt", f"{d}/good-client.crt", f"{d}/good-client.key")

    async def run() -> None:
        reg = EtcdRegistry(parse_endpoints(url), tls=tls)
        try:
            attrs = LeaseAttrs(IPv4Address("192.0.2.7"), "host-gw")
            assert await reg.create_lease(IPv4Network("198.18.7.0/24"), attrs, 60)
            listing = await reg.list_leases()
            assert listing.leases == {IPv4Network("198.18.7.0/24"): attrs}
        finally:
            await reg.close()

    asyncio.run(run())


@pytest.mark.parametrize("files", ["wrong-ca", "no-client-cert"])
def test_tls_refuses_an_untrusted_server_or_a_missing_client_cert(tls_etcd, files):
    url, d = tls_etcd
    if files == "wrong-ca":
        tls = TlsFiles(f"{d}/other-ca.crt", f"{d}/good-client.crt", f"{d}/good-client.key")
    else:
        tls = TlsFiles(f"{d}/good-ca.crt")

    async def run() -> None:
        reg = EtcdRegistry(parse_endpoints(url), tls=tls, timeout=2.0)
        try:
            with pytest.raises(RegistryUnavailable, match="no etcd endpoint answered"):
                await reg.list_leases()
        finally:
            await reg.close()

    asyncio.run(run())
