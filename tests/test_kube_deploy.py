"""deploy/kube-flannel-xdp.yml is accepted by the real kube-apiserver (server-side dry run:
schema, RBAC objects, Pod Security admission of the DaemonSet's pod template)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flannel_xdp.lab.kube import KubeApiServer

pytestmark = pytest.mark.kube

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kube-flannel-xdp.yml"


def test_manifest_passes_a_server_side_dry_run(tmp_path) -> None:
    kube = KubeApiServer(str(tmp_path / "kube"))
    kube.start()
    try:
        # A dry run creates nothing, so the namespaced objects need their namespace first.
        kube.kubectl("create", "namespace", "kube-flannel")
        out = kube.kubectl("apply", "--dry-run=server", "-f", str(MANIFEST))
        for obj in (
            "namespace/kube-flannel",
            "serviceaccount/flannel-xdp",
            "clusterrole.rbac.authorization.k8s.io/flannel-xdp",
            "clusterrolebinding.rbac.authorization.k8s.io/flannel-xdp",
            "configmap/kube-flannel-xdp-cfg",
            "daemonset.apps/kube-flannel-xdp-ds",
        ):
            assert obj in out, out
        # and the pods it makes would be admitted by the namespace's Pod Security level
        warnings = kube.kubectl("apply", "--dry-run=server", "-f", str(MANIFEST), check=False)
        assert "would violate PodSecurity" not in warnings, warnings
    finally:
        kube.stop()
