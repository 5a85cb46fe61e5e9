"""The Wake-on-LAN settings file (``controller --wol-config``): what it accepts and how it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.hardware import WolConfig, load_wol_config


def test_wol_config_reads_each_hosts_mac_and_defaults_the_rest(tmp_path: Path) -> None:
    """Pins the file format: only mac is required; broadcast, port and interface have defaults."""
    path = tmp_path / "wol.json"
    path.write_text(json.dumps({"h1": {"mac": "52:54:00:12:34:56"}, "h2": {"mac": "525400123457", "port": 7,
                                "broadcast": "10.0.0.255", "interface": "eth1"}}))  # fmt: skip
    configs = load_wol_config(path)
    assert configs["h1"] == WolConfig(mac="52:54:00:12:34:56")
    assert configs["h2"] == WolConfig(mac="525400123457", broadcast="10.0.0.255", port=7, interface="eth1")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"h1": {"mac": "not-a-mac"}}, "host 'h1'"),
        ({"h1": {"mac": "52:54:00:12:34:56", "broadcast": "::1"}}, "not an IPv4 address"),
        ({"h1": {"mac": "52:54:00:12:34:56", "macc": "x"}}, "macc"),
        ({"h1": {}}, "mac"),
    ],
)
def test_a_bad_wol_config_is_refused_with_the_host_and_the_field(
    tmp_path: Path, content: object, needle: str
) -> None:
    """A wrong MAC, broadcast or field name is an error that names the file, the host or the field."""
    path = tmp_path / "wol.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="Wake-on-LAN config") as caught:
        load_wol_config(path)
    assert needle in str(caught.value)
