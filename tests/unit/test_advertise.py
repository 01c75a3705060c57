"""The address join commands name (coordinator/advertise.py): chosen, then checked."""

from __future__ import annotations

import pytest

from picoord.coordinator.advertise import (
    Advertised,
    InvalidAdvertiseAddress,
    advertise_warnings,
    check_advertise_syntax,
    choose_advertised,
)
from picoord.coordinator.config import ConfigError, CoordinatorConfig


@pytest.mark.parametrize(
    ("configured", "listen", "route", "host", "source"),
    [
        ("desktop.lan", "0.0.0.0", "192.168.1.10", "desktop.lan", "advertise_address"),
        ("192.168.1.20", "10.0.0.1", "192.168.1.10", "192.168.1.20", "advertise_address"),
        ("", "10.0.0.1", "192.168.1.10", "10.0.0.1", "the listen address"),
        ("", "0.0.0.0", "192.168.1.10", "192.168.1.10", "the address of the default-route interface"),
        ("", "::", "fd00::10", "fd00::10", "the address of the default-route interface"),
        ("", "0.0.0.0", None, "desktop", "the hostname (no default route)"),
    ],
)
def test_choose_advertised(configured: str, listen: str, route: str | None, host: str, source: str) -> None:
    assert choose_advertised(configured, listen, route, "desktop") == Advertised(host, source)


@pytest.mark.parametrize("text", ["desktop", "desktop.lan", "pi-1.home.arpa.", "10.0.0.1", "fd00::1"])
def test_advertise_syntax_accepts_names_and_addresses(text: str) -> None:
    assert check_advertise_syntax(text) == text


@pytest.mark.parametrize(
    "text", ["desktop:7443", "[fd00::1]", "-desktop", "desk top", "10.0.0.256", "a_b", "x" * 64, "$(reboot)"]
)
def test_advertise_syntax_refuses_the_rest(text: str) -> None:
    with pytest.raises(InvalidAdvertiseAddress, match="advertise_address"):
        check_advertise_syntax(text)


def test_a_bad_advertise_address_is_a_config_error_naming_it() -> None:
    config = CoordinatorConfig(advertise_address="desktop:7443")
    with pytest.raises(ConfigError, match="advertise_address 'desktop:7443' is neither"):
        config.validate()


CONFIGURED = "advertise_address"
ROUTE = "the address of the default-route interface"


@pytest.mark.parametrize(
    ("host", "source", "listen", "resolved", "local", "warned"),
    [
        # fine: a LAN address of this host, however chosen
        ("192.168.1.10", ROUTE, "0.0.0.0", ["192.168.1.10"], {"192.168.1.10"}, None),
        ("desktop.lan", CONFIGURED, "0.0.0.0", ["192.168.1.10"], {"192.168.1.10"}, None),
        # loopback is right when the agent port itself listens on loopback only
        ("127.0.0.1", CONFIGURED, "127.0.0.1", ["127.0.0.1"], {"127.0.0.1"}, None),
        # a name that does not resolve here
        ("desktop", CONFIGURED, "0.0.0.0", None, set(), "does not resolve on this host"),
        # loopback while listening on all addresses (a hostname that maps to 127.0.1.1 too)
        ("127.0.0.1", CONFIGURED, "0.0.0.0", ["127.0.0.1"], {"127.0.0.1"}, "is a loopback address"),
        ("desktop", CONFIGURED, "", ["127.0.1.1"], {"127.0.1.1"}, "only an agent on this machine"),
        ("localhost", CONFIGURED, "::", ["::1", "127.0.0.1"], {"::1"}, "is a loopback address"),
        # an address not on this host
        ("192.168.1.99", CONFIGURED, "0.0.0.0", ["192.168.1.99"], set(), "is not an address of this host"),
        # no default route: the hostname, with the fix
        (
            "desktop",
            "the hostname (no default route)",
            "0.0.0.0",
            ["127.0.1.1"],
            {"127.0.1.1"},
            "no default route",
        ),
    ],
)
def test_advertise_warnings(
    host: str, source: str, listen: str, resolved: list[str] | None, local: set[str], warned: str | None
) -> None:
    warnings = advertise_warnings(Advertised(host, source), listen, resolved, local)
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0], warnings
        assert "advertise_address" in warnings[0]  # each names the setting that fixes it
