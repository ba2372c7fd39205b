"""Whose address a request counts as (SPEC §6: `X-Forwarded-For` only from trusted proxies)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network

import pytest
from starlette.requests import Request

from api.configs import Settings
from api.dependencies.limits import client_ip

PROXIES = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]


def request(peer: str | None, forwarded: str | None = None) -> Request:
    headers = [] if forwarded is None else [(b"x-forwarded-for", forwarded.encode())]
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": headers,
            "client": None if peer is None else (peer, 50000),
        }
    )


@pytest.mark.parametrize("trusted", [[], PROXIES])
def test_a_client_that_is_not_a_trusted_proxy_is_itself_whatever_it_forwards(
    trusted: list[IPv4Network | IPv6Network],
) -> None:
    assert client_ip(request("203.0.113.9", "198.51.100.1"), trusted) == "203.0.113.9"


def test_without_trusted_proxies_a_proxys_header_is_ignored_too() -> None:
    assert client_ip(request("10.0.0.2", "198.51.100.1"), []) == "10.0.0.2"


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ("198.51.100.1", "198.51.100.1"),
        # What a client sent itself is on the left; the trusted proxy appended the address
        # it saw. The rightmost address that is not a trusted proxy is the client.
        ("1.1.1.1, 198.51.100.1", "198.51.100.1"),
        ("not-an-address, 198.51.100.1", "198.51.100.1"),
        # Through two trusted proxies: both are skipped.
        ("198.51.100.1, 10.1.2.3", "198.51.100.1"),
        ("198.51.100.1,10.1.2.3 ,  10.9.9.9", "198.51.100.1"),
        ("2001:db8::7, fd00::1", "2001:db8::7"),
        # Only trusted hops: the leftmost is as far as the chain goes.
        ("10.1.1.1, 10.2.2.2", "10.1.1.1"),
    ],
)
def test_behind_a_trusted_proxy_the_rightmost_untrusted_hop_is_the_client(
    forwarded: str, expected: str
) -> None:
    assert client_ip(request("10.0.0.2", forwarded), PROXIES) == expected


@pytest.mark.parametrize("forwarded", [None, "", " , "])
def test_a_trusted_proxy_without_a_forwarded_address_is_the_client(forwarded: str | None) -> None:
    assert client_ip(request("10.0.0.2", forwarded), PROXIES) == "10.0.0.2"


def test_an_ipv6_proxy_is_trusted_by_its_network() -> None:
    assert client_ip(request("fd00::5", "198.51.100.1"), PROXIES) == "198.51.100.1"


def test_a_request_without_a_peer_is_unknown() -> None:
    assert client_ip(request(None, "198.51.100.1"), PROXIES) == "unknown"


def test_trusted_proxies_are_networks_from_settings() -> None:
    settings = Settings(_env_file=None, TRUSTED_PROXIES="10.0.0.0/8, fd00::/8")  # type: ignore[call-arg]
    assert settings.trusted_proxy_networks == PROXIES
    # A host address with bits set beyond its prefix is taken as its network.
    loose = Settings(_env_file=None, TRUSTED_PROXIES="10.1.2.3/8")  # type: ignore[call-arg]
    assert loose.trusted_proxy_networks == [ip_network("10.0.0.0/8")]
