"""Who may send what on one socket: the roles a tcp peer's key needs per message type.

On ipc (no CURVE) every peer is this host's own user and passes; over tcp the
connection's ``User-Id`` (the name its key was authorised under, ``qntx.bus.security``)
must still be authorised and hold one of the roles the message needs. The policies
themselves (which roles each message needs) are the protocol's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loguru import logger

from qntx.bus.security import Security
from qntx.errors import Forbidden

# Roles a peer's key needs to send each message type over tcp (qntx.bus.security).
# A message type's roles, or a function of the message that gives them (an Attest of
# a handler needs more than one of a plain claim).
RolePolicy = dict[type, frozenset[str] | Callable[[Any], frozenset[str]]]


class Revoked(Exception):
    """A message over a connection whose key was revoked since: it gets no answer."""


class Gate:
    """Who may send what on one socket. On ipc (no CURVE) every peer is this host's
    own user and passes; over tcp the peer's authorised name (the connection's
    ``User-Id``) must still be authorised and hold one of the roles the message needs."""

    def __init__(self, security: Security, endpoint: str, policy: RolePolicy | None):
        self.curve = security.active(endpoint)
        self.keyring = security.keyring if self.curve else None
        self.policy = policy or {}

    def roles(self, peer: str | None) -> frozenset[str]:
        return self.keyring.roles(peer) if self.keyring is not None and peer else frozenset()

    def check(self, peer: str | None, message: Any) -> None:
        """Raise Forbidden if ``peer`` may not send ``message``."""
        if not self.curve or peer is None:
            # No User-Id: it came over ipc (every CURVE connection passed the ZAP
            # handler, which names it).
            return
        held = self.roles(peer)
        if not held:
            logger.warning("dropped {} from {}: the key is no longer authorised", type(message).__name__, peer)
            raise Revoked(peer)
        needed = self.policy.get(type(message), frozenset({"admin"}))
        if callable(needed):
            needed = needed(message)
        if not held & needed:
            logger.warning("refused {} from {}: the key has role {}", type(message).__name__, peer, ", ".join(sorted(held)))
            raise Forbidden(
                f"{type(message).__name__} needs role {' or '.join(sorted(needed))}; key {peer!r} has {', '.join(sorted(held))}"
            )
