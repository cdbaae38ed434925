"""CURVE security for tcp endpoints: keys, and which side of a socket uses which.

ipc endpoints live in a 0700 directory and need nothing more. A ``tcp://``
endpoint is reachable from the network, so a socket that binds one is a CURVE
server (with a ZAP handler that admits only the client keys in
``<keys>/authorized/``) and a socket that connects to one is a CURVE client.
Without keys a tcp bind or connect is refused, unless ``insecure`` opts out
explicitly. ``qntx keys`` makes and lists the key files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from qntx.errors import Unavailable

SERVER = "server"
CLIENT = "client"


def needs_curve(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


@dataclass(frozen=True)
class Security:
    keys_dir: Path | None = None
    insecure: bool = False

    def _active(self, endpoint: str) -> bool:
        return needs_curve(endpoint) and not self.insecure

    def _load(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        if self.keys_dir is None:
            raise Unavailable("tcp endpoints need CURVE keys and no key directory is configured")
        path = self.keys_dir / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.is_file():
            raise Unavailable(
                f"tcp endpoints need CURVE keys and {path} is missing: run `qntx keys` "
                "(copy server.key to clients and their client.key into authorized/), or pass --insecure"
            )
        return zmq.auth.load_certificate(str(path))

    def bind(self, sock: zmq.Socket, endpoint: str) -> None:
        if self._active(endpoint):
            public, secret = self._load(SERVER, secret=True)
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_server = True
        sock.bind(endpoint)

    def connect(self, sock: zmq.Socket, endpoint: str) -> None:
        if self._active(endpoint):
            server_public, _ = self._load(SERVER, secret=False)
            public, secret = self._load(CLIENT, secret=True)
            sock.curve_serverkey = server_public
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        sock.connect(endpoint)

    def authenticator(self, context: zmq.Context, endpoints: list[str]):
        """Start a ZAP handler admitting only authorized client keys, if any endpoint needs it."""
        if not any(self._active(e) for e in endpoints):
            return None
        from zmq.auth.thread import ThreadAuthenticator

        authorized = self.keys_dir / "authorized"
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(authorized))
        return auth


PLAIN = Security()


def make_keys(keys_dir: Path) -> list[Path]:
    """Create the server and client key pairs that are missing; returns new files."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    authorized = keys_dir / "authorized"
    authorized.mkdir(mode=0o700, exist_ok=True)
    created = []
    for name in (SERVER, CLIENT):
        if not (keys_dir / f"{name}.key_secret").exists():
            public, secret = zmq.auth.create_certificates(str(keys_dir), name)
            created += [Path(public), Path(secret)]
    own = authorized / "client.key"
    if not own.exists():
        own.write_bytes((keys_dir / "client.key").read_bytes())
        created.append(own)
    return created
