"""The cluster secret: who may speak on the internal planes.

Every process of one fleet shares a secret (`--cluster-secret` / `LIGHTSPEED_CLUSTER_SECRET`;
`serve` makes one per run). From it come, by HMAC-SHA256 with a distinct label each, so a value
learnt in one use is worthless in another:

* the request-plane handshake (mutual challenge-response when a connection opens): the worker
  sends a random nonce, the caller answers with HMAC(k, "caller" | server nonce | caller nonce)
  and its own nonce, the worker proves itself with HMAC(k, "worker" | caller nonce | server nonce).
  Nonces make every answer single-use; neither side ever sends the secret, and a peer that fails
  or stalls is dropped before it can send a request (or, for a worker, receive a prompt).
* the zmq event plane's CURVE keys (encryption, and no subscriber without the secret);
* signatures of discovery cards: HMAC over the card's canonical bytes, so a card written into a
  shared discovery folder (or an etcd prefix) by someone without the secret is ignored.

Comparisons are constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

NONCE_BYTES = 32
MIN_SECRET_CHARS = 16  # a short secret is guessable offline from one recorded handshake
_LABEL_HANDSHAKE = b"lightspeed/request-plane/v1"
_LABEL_CARDS = b"lightspeed/discovery-card/v1"
_LABEL_EVENTS = b"lightspeed/event-plane-curve/v1"


def generate_secret() -> str:
    """A fresh secret for one `serve` run (256 bits, hex)."""
    return secrets.token_hex(32)


def _derive(secret: str, label: bytes) -> bytes:
    return hmac.new(secret.encode(), label, hashlib.sha256).digest()


def check_secret(secret: str) -> None:
    if secret and len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"cluster secret must be >= {MIN_SECRET_CHARS} characters (or empty: planes open)")


@dataclass(frozen=True)
class ClusterKey:
    """The keys derived from one cluster secret."""

    handshake: bytes
    cards: bytes
    # The Curve25519 secret key every zmq event publisher of the fleet serves with. Its public
    # half is derived from it, so only holders of the cluster secret can complete the CURVE
    # handshake (subscribe) and the plane is encrypted.
    events: bytes

    @classmethod
    def from_secret(cls, secret: str) -> ClusterKey:
        check_secret(secret)
        if not secret:
            raise ValueError("an empty cluster secret derives no key")
        return cls(_derive(secret, _LABEL_HANDSHAKE), _derive(secret, _LABEL_CARDS), _derive(secret, _LABEL_EVENTS))

    # -------------------------------------------------------------- request-plane handshake

    def caller_proof(self, server_nonce: bytes, caller_nonce: bytes) -> bytes:
        return _mac(self.handshake, b"caller", server_nonce, caller_nonce)

    def worker_proof(self, server_nonce: bytes, caller_nonce: bytes) -> bytes:
        return _mac(self.handshake, b"worker", caller_nonce, server_nonce)

    # -------------------------------------------------------------- discovery cards

    def sign(self, payload: bytes) -> str:
        return hmac.new(self.cards, payload, hashlib.sha256).hexdigest()

    def verify(self, payload: bytes, signature: str) -> bool:
        return hmac.compare_digest(self.sign(payload), signature)


def _mac(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    # Lengths are fixed (NONCE_BYTES), so plain concatenation is unambiguous.
    return hmac.new(key, role + first + second, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proofs_match(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
