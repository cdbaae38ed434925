"""Settings resolve home -> config file -> environment -> flags, once."""

from __future__ import annotations

import pytest

from qntx.errors import Invalid
from qntx.settings import load_settings

pytestmark = pytest.mark.timeout(30)


def test_defaults_derive_ipc_endpoints_from_the_home(tmp_path):
    s = load_settings(tmp_path, environ={})
    assert s.home == tmp_path.resolve()
    assert s.ats_endpoint == f"ipc://{tmp_path.resolve()}/run/ats.sock"
    assert s.server_endpoint.endswith("/run/server.sock") and s.workers == 2


def test_precedence_config_then_environment_then_flags(tmp_path):
    (tmp_path / "config.toml").write_text('workers = 3\nheartbeat_s = 2.5\nserver_endpoint = "tcp://127.0.0.1:7001"\n')
    s = load_settings(tmp_path, environ={"QNTX_WORKERS": "5"})
    assert s.workers == 5 and s.heartbeat_s == 2.5 and s.server_endpoint == "tcp://127.0.0.1:7001"
    assert load_settings(tmp_path, environ={"QNTX_WORKERS": "5"}, workers=7).workers == 7
    assert load_settings(tmp_path, environ={"QNTX_WORKERS": "5"}, workers=None).workers == 5


def test_home_from_the_environment(tmp_path):
    assert load_settings(None, environ={"QNTX_HOME": str(tmp_path)}).home == tmp_path.resolve()


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("no", False), ("0", False)])
def test_booleans_from_the_environment(tmp_path, raw, expected):
    assert load_settings(tmp_path, environ={"QNTX_INSECURE": raw}).insecure is expected


def test_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(Invalid, match="QNTX_WORKERS"):
        load_settings(tmp_path, environ={"QNTX_WORKERS": "many"})
    with pytest.raises(Invalid, match="QNTX_INSECURE"):
        load_settings(tmp_path, environ={"QNTX_INSECURE": "maybe"})
    with pytest.raises(Invalid, match="unknown setting"):
        load_settings(tmp_path, environ={}, colour="blue")
    (tmp_path / "config.toml").write_text("workers = [")
    with pytest.raises(Invalid, match="config.toml"):
        load_settings(tmp_path, environ={})


def test_an_unknown_config_key_is_named_with_the_closest_known_one(tmp_path):
    (tmp_path / "config.toml").write_text("worker = 3\n")
    expected = r"config.toml: unknown setting 'worker'; did you mean 'workers'\?"
    with pytest.raises(Invalid, match=expected):
        load_settings(tmp_path, environ={})
    (tmp_path / "config.toml").write_text("colour = 'blue'\n")
    with pytest.raises(Invalid, match=r"unknown setting 'colour'$"):
        load_settings(tmp_path, environ={})
    (tmp_path / "config.toml").write_text("[plugin.python]\nx = 1\n")
    with pytest.raises(Invalid, match="did you mean 'plugins'"):
        load_settings(tmp_path, environ={})


def test_plugin_tables_are_kept_for_the_plugins(tmp_path):
    (tmp_path / "config.toml").write_text("workers = 1\n[plugins.python]\ngreeting = 'hi'\n")
    s = load_settings(tmp_path, environ={})
    assert s.workers == 1 and s.extra == {"plugins": {"python": {"greeting": "hi"}}}
    (tmp_path / "config.toml").write_text("plugins = 3\n")
    with pytest.raises(Invalid, match="plugins must be a table"):
        load_settings(tmp_path, environ={})
