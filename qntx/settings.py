"""Settings, resolved once: home -> <home>/config.toml -> QNTX_* environment -> flags.

Every actor and command receives one ``Settings`` and reads nothing else from the
environment. Endpoints default to ipc sockets under ``<home>/run`` (mode 0700);
any of them can be set to a ``tcp://`` address for a multi-machine bus.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qntx.errors import Invalid

if TYPE_CHECKING:  # (imported when asked for: it brings in pyzmq, which embedded commands never use)
    from qntx.bus.security import Security

DEFAULT_HOME = "~/.qntx"
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Settings:
    home: Path
    workers: int = 2  # worker processes started by `qntx up`
    request_timeout_s: float = 10.0
    max_message_bytes: int = 16 << 20
    max_payload_bytes: int = 15 << 20  # a job's payload, as MessagePack
    max_result_bytes: int = 15 << 20  # a job's result, as MessagePack
    # Where the ATS keeps attestations: "" is LMDB under the home; postgresql://... a
    # PostgreSQL database migrated by `qntx db upgrade` (qntx.ats.backend)
    store: str = ""
    ats_map_size: int = 1 << 30  # initial LMDB map; it grows on demand
    ats_max_map_size: int = 0  # the map never grows past it (0: only the disk limits it)
    python_pool_size: int = 0  # python jobs at once (fork servers of the plugin); 0: as many as `workers`
    python_memory_mb: int = 1024  # address-space limit per handler run
    python_cpu_s: int = 600  # CPU-seconds limit per handler run
    python_file_mb: int = 1024  # largest file a handler run may write
    python_processes: int = 64  # processes and threads a handler run may add
    python_fresh_process: bool = False  # a new process per job even if the last left no trace
    heartbeat_s: float = 1.0  # worker and plugin liveness interval
    keep_completed_s: float = 7 * 86400.0  # completed jobs are pruned this long after they finished
    keep_failed_s: float = 30 * 86400.0  # failed and cancelled ones (the dead-letter view) longer
    keep_completed_max: int = 1_000_000  # and past this many completed jobs, the oldest go
    prune_every_s: float = 60.0  # how often the server prunes finished jobs in the background
    log_max_bytes: int = 10 << 20  # each <home>/logs/<actor>.log rotates at this size
    log_files: int = 5  # rotated files kept per actor
    log_format: str = "text"  # "json": one JSON object per line (actor, job, lease, handler, trace id where known)
    # HOST:PORT where `qntx up` serves Prometheus metrics for the whole bus ("": none;
    # port 0: any free port, written to <home>/run/metrics.address)
    metrics: str = "127.0.0.1:9464"
    insecure: bool = False  # allow tcp endpoints without CURVE (explicit opt-out)
    bind: str = ""  # tcp://HOST:PORT: also serve other hosts there (and on the next 5 ports)
    # tcp ports the jobs pipes of sessions from other hosts take, "FIRST-LAST"
    # (default: the 100 ports after bind's six), so a firewall opens one known range
    jobs_ports: str = ""
    connect: str = ""  # tcp://HOST:PORT of another host's server (or several, comma-separated): use that bus (qntx.join)
    # https://NAME[:PORT]: where people open `qntx ui` through a (TLS) proxy; actions
    # from pages of that origin are then accepted, and that host name on a loopback ui
    ui_public_url: str = ""
    ats_endpoint: str = ""
    ats_events_endpoint: str = ""
    server_endpoint: str = ""
    events_endpoint: str = ""
    workers_endpoint: str = ""
    results_endpoint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def python_interpreters(self) -> int:
        """How many python jobs the plugin runs at once."""
        return self.python_pool_size or self.workers

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def ats_path(self) -> Path:
        return self.home / "ats"

    @property
    def pulse_path(self) -> Path:
        return self.home / "pulse"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def security(self) -> Security:
        from qntx.bus.security import Security

        return Security(keys_dir=self.keys_dir, insecure=self.insecure)

    def lock_path(self, actor: str) -> Path:
        """The pid lock an actor holds while it runs (``qntx.bus.pidlock``)."""
        return self.run_dir / f"{actor}.lock"

    def public(self, endpoint_name: str) -> str:
        """The tcp endpoint other hosts reach ``endpoint_name`` on ("" without ``bind``)."""
        return tcp_endpoints(self.bind)[endpoint_name] if self.bind else ""

    def for_other_hosts(self, endpoint_name: str) -> str:
        """What a host joining through the server is told to connect to."""
        return self.public(endpoint_name) or getattr(self, endpoint_name)

    def plugin_endpoint(self, name: str) -> str:
        return f"ipc://{self.run_dir}/plugin-{name}.sock"

    def ensure_dirs(self) -> None:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        self.logs_dir.mkdir(mode=0o700, exist_ok=True)
        make_private(self.home)


def make_private(home: Path) -> None:
    """The home and everything in it readable by its owner alone (0700 / 0600), also
    what an older version left readable: keys, data, handler code, payloads, logs."""
    for path in (home, *home.rglob("*")):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue  # removed meanwhile
        if stat.S_ISDIR(st.st_mode):
            wanted = 0o700
        elif stat.S_ISREG(st.st_mode):
            wanted = st.st_mode & 0o700 or 0o600
        else:
            continue  # sockets live in the 0700 run directory; links are not followed
        if stat.S_IMODE(st.st_mode) != wanted:
            os.chmod(path, wanted)


_ENDPOINTS = {
    "ats_endpoint": "ats.sock",
    "ats_events_endpoint": "ats-events.sock",
    "server_endpoint": "server.sock",
    "events_endpoint": "events.sock",
    "workers_endpoint": "workers.sock",
    "results_endpoint": "results.sock",
}
_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name not in ("home", "extra")}
# Tables of config.toml kept as they are for others to read: ``[plugins.<name>]`` is
# each plugin's config (docs/PROTOCOL.md).
_TABLES = ("plugins",)


def _unknown_key(key: str, origin: str) -> Invalid:
    """The error for a key no setting has, with the closest known one when there is one."""
    close = difflib.get_close_matches(key, [*_FIELDS, *_TABLES], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return Invalid(f"{origin}: unknown setting {key!r}{hint}")


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = type(_FIELDS[name].default)
    if kind is bool and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise Invalid(f"{origin}: {name} must be true or false, got {value!r}")
    try:
        coerced = kind(value)
    except (TypeError, ValueError):
        raise Invalid(f"{origin}: {name} must be {kind.__name__}, got {value!r}") from None
    if kind is float:  # seconds: a number of them, and some more than none
        least = 0.0 if name.startswith("keep_") else None
        if not math.isfinite(coerced) or coerced < 0 or (least is None and coerced == 0):
            bound = ">= 0" if least is not None else "> 0"
            raise Invalid(f"{origin}: {name} must be a number of seconds {bound}, got {value!r}")
    return coerced


# The order of the ports `qntx up --bind tcp://HOST:PORT` takes, from PORT on.
_TCP_ORDER = ("server_endpoint", "workers_endpoint", "results_endpoint", "events_endpoint", "ats_endpoint", "ats_events_endpoint")


def tcp_endpoints(bind: str) -> dict[str, str]:
    """Every bus endpoint on ``tcp://HOST:PORT`` and the 5 ports after it."""
    scheme, _, rest = bind.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit() or not 0 < int(port) <= 65535 - len(_TCP_ORDER):
        raise Invalid(f"--bind needs tcp://HOST:PORT with a port below {65536 - len(_TCP_ORDER)}, got {bind!r}")
    return {name: f"tcp://{host}:{int(port) + n}" for n, name in enumerate(_TCP_ORDER)}


JOBS_PORTS_DEFAULT = 100


def jobs_port_range(settings: Settings) -> range:
    """The tcp ports sessions from other hosts get their jobs pipes on."""
    text = settings.jobs_ports
    if not text:
        if not settings.bind:
            return range(0)
        first = int(settings.bind.rpartition(":")[2]) + len(_TCP_ORDER)
        return range(first, min(first + JOBS_PORTS_DEFAULT, 65536))
    low, sep, high = text.partition("-")
    if not (low.strip().isdigit() and (not sep or high.strip().isdigit())):
        raise Invalid(f"jobs_ports must be FIRST-LAST (e.g. 7410-7499), got {text!r}")
    first, last = int(low), int(high) if sep else int(low)
    if not 0 < first <= last <= 65535:
        raise Invalid(f"jobs_ports must be FIRST-LAST within 1-65535, got {text!r}")
    return range(first, last + 1)


def load_settings(home: str | Path | None = None, environ: dict[str, str] | None = None, **flags: Any) -> Settings:
    """Resolve settings. ``flags`` with value None are ignored (an unset CLI flag)."""
    env = os.environ if environ is None else environ
    home_path = Path(home or env.get("QNTX_HOME") or DEFAULT_HOME).expanduser().resolve()
    if home_path.exists() and not home_path.is_dir():
        raise Invalid(f"home {home_path} is not a directory")
    values: dict[str, Any] = {}
    config_file = home_path / "config.toml"
    extra: dict[str, Any] = {}
    if config_file.is_file():
        try:
            loaded = tomllib.loads(config_file.read_text())
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise Invalid(f"{config_file}: {exc}") from None
        for key, value in loaded.items():
            if key in _FIELDS:
                values[key] = _coerce(key, value, str(config_file))
            elif key in _TABLES:
                if not isinstance(value, dict):
                    raise Invalid(f"{config_file}: {key} must be a table ([{key}.<name>])")
                extra[key] = value
            else:
                raise _unknown_key(key, str(config_file))
    for name in _FIELDS:
        raw = env.get(f"QNTX_{name.upper()}")
        if raw:
            values[name] = _coerce(name, raw, f"QNTX_{name.upper()}")
    for name, value in flags.items():
        if value is not None:
            if name not in _FIELDS:
                raise _unknown_key(name, "flags")
            values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    for name, sock in _ENDPOINTS.items():
        if not values.get(name):
            values[name] = f"ipc://{home_path / 'run' / sock}"
    from qntx.db import check_store_setting

    check_store_setting(values.get("store", ""))
    if values.get("log_format", "text") not in LOG_FORMATS:
        raise Invalid(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {values['log_format']!r}")
    return Settings(home=home_path, extra=extra, **values)
