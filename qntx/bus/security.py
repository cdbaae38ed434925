"""CURVE security for tcp endpoints: this host's keys, the authorised keys and their roles,
and the ZAP handler that admits only those.

ipc endpoints live in a 0700 directory and need nothing more: their peers are this
host's own user. A ``tcp://`` endpoint is reachable from the network, so a socket
that binds one is a CURVE server in the ZAP domain ``qntx``, and the ZAP handler of
its context is started before the bind (fail-closed: no handler, no bind). The
handler admits a client only if its public key is in ``<keys>/authorized.json``; the
name it was authorised under becomes the connection's ``User-Id``, which every
message received on it carries, and services check that name's roles per message.

Files under ``<home>/keys`` (directory 0700, files 0600):

* ``host.key`` / ``host.key_secret``: this host's key pair, for binding and connecting;
* ``server.key``: the public key of the bus this host connects to (default: its own);
* ``authorized.json``: ``{name: {"key": z85, "roles": [...], "added": iso time}}``.

Without keys a tcp bind or connect is refused, unless ``insecure`` opts out explicitly.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq

from qntx.errors import Invalid, NotFound, Unavailable
from qntx.protocol.roles import ROLES

# What each role may send is in qntx.protocol (ATS_ROLES, SERVER_ROLES, …).
ZAP_DOMAIN = "qntx"
ONLY = "/only/"  # "qntx/only/NAME": a socket only the key authorised as NAME may reach
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
HOST = "host"
SERVER = "server"
AUTHORIZED = "authorized.json"
# How often a keyring looks at authorized.json for changes (revocations take effect then).
KEYRING_CHECK_S = 0.5


def needs_curve(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def private_file(path: Path, data: bytes) -> None:
    """Write ``path`` readable by its owner alone, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Authorized:
    name: str
    key: str  # z85 public key
    roles: tuple[str, ...]
    added: str


class Keyring:
    """The authorised keys, read from ``authorized.json`` again whenever it changes."""

    def __init__(self, keys_dir: Path):
        self.path = keys_dir / AUTHORIZED
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._by_key: dict[str, Authorized] = {}
        self._by_name: dict[str, Authorized] = {}
        self._lock = threading.Lock()
        self.generation = 0  # grows each time the file changed

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < KEYRING_CHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:  # gone, or unreadable: read_authorized says which, and admits nobody
                stamp = None
            if stamp == self._stamp and self.generation:
                return
            entries = read_authorized(self.path)
            self._by_name = entries
            self._by_key = {e.key: e for e in entries.values()}
            self._stamp = stamp
            self.generation += 1

    def by_key(self, key: str) -> Authorized | None:
        self.refresh(force=True)  # a handshake is rare: a change counts at once
        return self._by_key.get(key)

    def names(self) -> frozenset[str]:
        self.refresh()
        return frozenset(self._by_name)

    def roles(self, name: str) -> frozenset[str]:
        """The roles of the key authorised as ``name`` (none once it is revoked)."""
        self.refresh()
        entry = self._by_name.get(name)
        return frozenset(entry.roles) if entry is not None else frozenset()


def read_authorized(path: Path) -> dict[str, Authorized]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        # A broken file admits nobody rather than everybody.
        from loguru import logger

        logger.error("{} cannot be read ({}); no key is authorised", path, exc)
        return {}
    entries = {}
    for name, value in raw.items() if isinstance(raw, dict) else ():
        if isinstance(value, dict) and isinstance(value.get("key"), str):
            listed = value.get("roles")  # (a hand-edited entry may hold anything here)
            roles = tuple(r for r in listed if r in ROLES) if isinstance(listed, list) else ()
            entries[name] = Authorized(name, value["key"], roles, str(value.get("added", "")))
    return entries


def _write_authorized(keys_dir: Path, entries: dict[str, Authorized]) -> None:
    data = {e.name: {"key": e.key, "roles": list(e.roles), "added": e.added} for e in entries.values()}
    private_file(keys_dir / AUTHORIZED, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


Z85_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
KEY_LENGTH = 40  # 32 bytes of Curve25519 public key, 5 Z85 characters per 4 bytes


def parse_public_key(text: str) -> str:
    """A CURVE public key as a person passes it: the 40 Z85 characters ``qntx keys show``
    prints, optionally shell-quoted, or a certificate file's ``public-key = "..."`` line.
    Anything else is ``Invalid`` with one line naming what is wrong."""
    key = text.strip()
    for line in key.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == "public-key":  # a certificate file (host.key)
            key = value.strip()
            break
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "'\"":
        key = key[1:-1]
    if not key:
        raise Invalid("the public key is empty (expected 40 characters of Z85, as `qntx keys show` prints)")
    foreign = sorted({c for c in key if c not in Z85_ALPHABET})
    if foreign:
        shown = " ".join(repr(c) for c in foreign[:5])
        raise Invalid(f"the public key has characters outside Z85: {shown} (expected 40 characters of Z85)")
    if len(key) != KEY_LENGTH:
        raise Invalid(f"the public key is {len(key)} characters long; a CURVE public key is {KEY_LENGTH} characters of Z85")
    import zmq.utils.z85

    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, OverflowError, struct.error):
        raise Invalid("the public key is not valid Z85 (a group of 5 characters is out of range)") from None
    return key


def allow(keys_dir: Path, name: str, key: str, roles: list[str]) -> Authorized:
    """Authorise ``key`` as ``name`` with ``roles`` (replacing what ``name`` had)."""
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise Invalid(f"key name {name!r} must be letters, digits, '-', '_' or '.'")
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise Invalid(f"--role must be one or more of {', '.join(ROLES)} (got {', '.join(unknown) or 'none'})")
    key = parse_public_key(key)
    make_keys(keys_dir)
    entries = read_authorized(keys_dir / AUTHORIZED)
    for other in entries.values():
        if other.key == key and other.name != name:
            raise Invalid(f"that key is already authorised as {other.name!r}: revoke it first")
    entry = Authorized(name, key, tuple(dict.fromkeys(roles)), datetime.now(UTC).isoformat(timespec="seconds"))
    entries[name] = entry
    _write_authorized(keys_dir, entries)
    return entry


def revoke(keys_dir: Path, name: str) -> None:
    entries = read_authorized(keys_dir / AUTHORIZED)
    if entries.pop(name, None) is None:
        raise NotFound(f"no key is authorised as {name!r}")
    _write_authorized(keys_dir, entries)


def host_public_key(keys_dir: Path) -> str:
    import zmq.auth

    return zmq.auth.load_certificate(str(keys_dir / f"{HOST}.key"))[0].decode()


def set_server_key(keys_dir: Path, key: str) -> None:
    """The public key of the bus server this host connects to with ``--connect``."""
    key = parse_public_key(key)
    make_keys(keys_dir)
    data = f'metadata\ncurve\n    public-key = "{key}"\n'.encode()
    private_file(keys_dir / f"{SERVER}.key", data)


def make_keys(keys_dir: Path) -> list[Path]:
    """Create this host's key pair if missing, authorise it on this host with every
    role, and make every key file private; returns the new files."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    created = []
    if not (keys_dir / f"{HOST}.key_secret").exists():
        import zmq.auth

        public, secret = zmq.auth.create_certificates(str(keys_dir), HOST)
        created += [Path(public), Path(secret)]
    for path in keys_dir.iterdir():
        if path.is_file():
            os.chmod(path, 0o600)
    server = keys_dir / f"{SERVER}.key"
    if not server.exists():
        private_file(server, (keys_dir / f"{HOST}.key").read_bytes())
        created.append(server)
    authorized = keys_dir / AUTHORIZED
    if not authorized.exists():
        own = Authorized(HOST, host_public_key(keys_dir), ROLES, datetime.now(UTC).isoformat(timespec="seconds"))
        _write_authorized(keys_dir, {HOST: own})
        created.append(authorized)
    return created


# ---------------------------------------------------------------------- ZAP


class ZapHandler:
    """Answers the ZAP requests of one context: CURVE in domain ``qntx`` with an
    authorised key, or nothing. Runs on its own thread, started before any bind."""

    def __init__(self, context: zmq.Context, keyring: Keyring):
        self.keyring = keyring
        self._socket = context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="zap", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self._socket.poll(250):
                    frames = self._socket.recv_multipart()
                    try:
                        reply = self.answer(frames)
                    except Exception as exc:  # refused, and the next handshake is answered again
                        request_id = frames[1] if len(frames) > 1 else b""
                        reply = self._deny(request_id, "a peer", f"its request could not be checked: {exc!r}")
                    self._socket.send_multipart(reply)
        except zmq.ZMQError:
            pass  # the context is going away
        finally:
            self._socket.close(0)

    def answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism, *credentials = frames
        peer = address.decode(errors="replace")
        domain_name, _, only = domain.decode(errors="replace").partition(ONLY)
        if domain_name != ZAP_DOMAIN:
            return self._deny(request_id, peer, f"domain {domain!r} is not {ZAP_DOMAIN!r}")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return self._deny(request_id, peer, f"mechanism {mechanism.decode(errors='replace')} is not CURVE")
        import zmq.utils.z85

        key = zmq.utils.z85.encode(credentials[0]).decode()
        entry = self.keyring.by_key(key)
        if entry is None or not entry.roles:
            return self._deny(request_id, peer, f"key {key} is not authorised")
        if only and entry.name != only:
            return self._deny(request_id, peer, f"key {entry.name} may not connect to a socket of {only}")
        return [version, request_id, b"200", b"OK", entry.name.encode(), b""]

    @staticmethod
    def _deny(request_id: bytes, peer: str, why: str) -> list[bytes]:
        from loguru import logger

        logger.warning("refused a connection from {}: {}", peer, why)
        return [b"1.0", request_id, b"400", why.encode(), b"", b""]

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


_zap_handlers: dict[int, ZapHandler] = {}
_keyrings: dict[Path, Keyring] = {}
_registry_lock = threading.Lock()


def keyring_for(keys_dir: Path) -> Keyring:
    with _registry_lock:
        keyring = _keyrings.get(keys_dir)
        if keyring is None:
            keyring = _keyrings[keys_dir] = Keyring(keys_dir)
        return keyring


def _ensure_zap(context: zmq.Context, keyring: Keyring) -> None:
    with _registry_lock:
        handler = _zap_handlers.get(context.underlying)
        # (A handler whose thread ended belonged to a destroyed context at the same address.)
        if handler is None or not handler.alive:
            sync = context if type(context) is zmq.Context else zmq.Context.shadow(context.underlying)
            _zap_handlers[context.underlying] = ZapHandler(sync, keyring)


def stop_zap(context: zmq.Context) -> None:
    """Stop the ZAP handler of ``context`` (before the context is destroyed)."""
    with _registry_lock:
        handler = _zap_handlers.pop(context.underlying, None)
    if handler is not None:
        handler.stop()


def peer_name(frame: zmq.Frame) -> str | None:
    """The authorised name of the CURVE peer a message came from (None on ipc)."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


@dataclass(frozen=True)
class Security:
    keys_dir: Path | None = None
    insecure: bool = False

    def active(self, endpoint: str) -> bool:
        return needs_curve(endpoint) and not self.insecure

    @property
    def keyring(self) -> Keyring:
        return keyring_for(self.keys_dir)

    def _load(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        if self.keys_dir is None:
            raise Unavailable("tcp endpoints need CURVE keys and no key directory is configured")
        path = self.keys_dir / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.is_file():
            raise Unavailable(
                f"tcp endpoints need CURVE keys and {path} is missing: run `qntx keys` "
                "(see docs/DEPLOY.md), or pass --insecure"
            )
        import zmq.auth

        return zmq.auth.load_certificate(str(path))

    def bind(self, sock: zmq.Socket, endpoint: str, only: str | None = None) -> None:
        if self.active(endpoint):
            public, secret = self._load(HOST, secret=True)
            _ensure_zap(sock.context, self.keyring)  # before the bind: fail-closed
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_server = True
            sock.zap_domain = (ZAP_DOMAIN + (ONLY + only if only else "")).encode()
            # libzmq itself then refuses every client while no ZAP handler answers.
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.bind(endpoint)

    def connect(self, sock: zmq.Socket, endpoint: str) -> None:
        if self.active(endpoint):
            server_public, _ = self._load(SERVER, secret=False)
            public, secret = self._load(HOST, secret=True)
            sock.curve_serverkey = server_public
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(endpoint)

    def runner_keys(self) -> str:
        """What a handler interpreter needs to connect like this process ("" on ipc)."""
        return "" if self.keys_dir is None or self.insecure else str(self.keys_dir)


PLAIN = Security()
