"""The kernel's build configuration as loader/kconfig.py reads it (CONFIG_HZ for the fast
path's conntrack timeouts): the first source that has the option wins, a gzipped one
is read too, and a missing or odd value is a clear error."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from flannel_xdp.loader import kconfig

pytestmark = pytest.mark.unit


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    boot, proc = tmp_path / "config-test", tmp_path / "config.gz"
    monkeypatch.setattr(kconfig, "_sources", lambda: [boot, proc])
    return boot, proc


def test_hz_from_boot_config(sources):
    boot, _ = sources
    boot.write_text("# comment\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n")
    assert kconfig.hz() == 250


def test_hz_from_proc_config_gz_when_boot_has_none(sources):
    boot, proc = sources
    boot.write_text("CONFIG_NET=y\n")
    proc.write_bytes(gzip.compress(b"CONFIG_HZ=1000\n"))
    assert kconfig.hz() == 1000


def test_no_source_is_a_clear_error(sources):
    with pytest.raises(kconfig.KconfigError, match=r"CONFIG_HZ is unknown .*config-test"):
        kconfig.hz()


def test_a_value_that_is_not_a_number_is_refused(sources):
    boot, _ = sources
    boot.write_text('CONFIG_HZ="fast"\n')
    with pytest.raises(kconfig.KconfigError, match="not a number"):
        kconfig.hz()
