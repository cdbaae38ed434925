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


def test_the_store_is_lmdb_or_a_postgresql_url(tmp_path):
    from qntx.ats.backend import open_store
    from qntx.ats.store import AttestationStore
    from qntx.db import redact

    assert load_settings(tmp_path, environ={}).store == ""
    with open_store(load_settings(tmp_path, environ={})) as store:  # the default: LMDB in the home
        assert isinstance(store, AttestationStore) and store.location == str(tmp_path.resolve() / "ats")
    (tmp_path / "config.toml").write_text('store = "postgresql://qntx@db.example/qntx"\n')
    assert load_settings(tmp_path, environ={}).store == "postgresql://qntx@db.example/qntx"
    url = "postgres://u@h/d"
    assert load_settings(tmp_path, environ={"QNTX_STORE": url}).store == url
    for bad in ("mysql://u@h/d", "/var/lib/qntx", "sqlite:///x"):
        with pytest.raises(Invalid, match="store must be empty .* or postgresql://"):
            load_settings(tmp_path, environ={}, store=bad)
    assert redact("postgresql://qntx:s3cret@db:5432/qntx?sslmode=verify-full") == (
        "postgresql://qntx:***@db:5432/qntx?sslmode=verify-full"
    )
    assert redact("postgresql://qntx@/qntx?host=/run/postgresql") == "postgresql://qntx@/qntx?host=/run/postgresql"
    assert redact("postgresql:///qntx?host=/tmp&password=s3cret&sslmode=require") == (
        "postgresql:///qntx?host=/tmp&password=***&sslmode=require"
    )
