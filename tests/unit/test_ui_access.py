"""Who may reach the dashboard: addresses, host names, the token file (no server)."""

from __future__ import annotations

import stat

import pytest

from qntx.errors import Invalid
from qntx.ui.access import Access, check_bind, is_loopback, load_token, public_origin


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"])
def test_loopback_addresses(host):
    assert is_loopback(host)
    check_bind(host, allow_remote=False)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "192.0.2.7", "::", "example.org", "localhost.example.org"]
)
def test_other_addresses_need_the_flag(host):
    assert not is_loopback(host)
    with pytest.raises(Invalid, match="--allow-remote"):
        check_bind(host, allow_remote=False)
    check_bind(host, allow_remote=True)


def test_a_loopback_server_answers_only_loopback_host_names():
    access = Access(port=8765, token=None, csrf="x")
    for good in ("127.0.0.1:8765", "localhost:8765", "localhost", "[::1]:8765"):
        assert access.allowed_host(good), good
    for bad in ("rebound.example:8765", "evil.example", "10.0.0.1:8765"):
        assert not access.allowed_host(bad), bad
    assert Access(port=8765, token="t", csrf="x").allowed_host("anything.example")


def test_the_token_is_made_once_and_kept_private(tmp_path):
    token, made = load_token(tmp_path)
    assert made and len(token) >= 40
    assert stat.S_IMODE((tmp_path / "ui.token").stat().st_mode) == 0o600
    assert load_token(tmp_path) == (token, False)


@pytest.mark.parametrize(
    "url, origin",
    [
        ("https://qntx.example", "https://qntx.example"),
        ("https://qntx.example:443/", "https://qntx.example"),
        ("https://QNTX.example:8443/dash/", "https://qntx.example:8443"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("", None),
    ],
)
def test_the_public_url_gives_the_origin_a_browser_sends(url, origin):
    assert public_origin(url) == origin


@pytest.mark.parametrize("url", ["qntx.example", "ftp://qntx.example", "https://", "https://x:99999"])
def test_a_public_url_that_is_not_one_is_bad_input(url):
    with pytest.raises(Invalid, match="ui_public_url"):
        public_origin(url)


def test_a_public_name_is_a_host_a_loopback_server_answers():
    access = Access(port=8765, token=None, csrf="x", public="https://qntx.example:8443")
    assert access.allowed_host("qntx.example:8443") and access.allowed_host("QNTX.example")
    assert access.allowed_host("127.0.0.1:8765") and not access.allowed_host("evil.example")
