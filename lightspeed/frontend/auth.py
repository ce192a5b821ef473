"""The front door: OpenAI-style API keys (`Authorization: Bearer KEY`) and per-key rate limits.

Keys come from `--api-key` and/or `--api-keys-file` (one key per line: `KEY [name=NAME] [rpm=N]
[tpm=N]`, `#` comments; rpm / tpm override the `--rate-limit-*` defaults for that key). Keys are
held only as SHA-256 digests and looked up by digest, so neither a log line nor a lookup's timing
gives a key away; errors and logs name a key by its `name`.

Unauthenticated paths: `/live` always (it says only that the process runs, which liveness probes
need), `/health` and `/metrics` only when configured public (they list workers and traffic).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from lightspeed.errors import LightspeedError, Unauthorized
from lightspeed.frontend.rate_limit import Limits, RateLimiter

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorResponder = Callable[[LightspeedError], web.Response]
API_KEY = web.RequestKey("lightspeed_api_key", str)  # request[API_KEY]: the authenticated key's name
MIN_KEY_CHARS = 8  # shorter is more likely a typo than a secret
_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces, as HTTP headers carry it
_LIMITED_METHODS = frozenset({"POST"})  # generation endpoints; GETs (models) are not rate limited


@dataclass(frozen=True)
class ApiKey:
    name: str
    limits: Limits


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check_key(key: str, where: str) -> None:
    if len(key) < MIN_KEY_CHARS or not _KEY_RE.match(key):
        raise ValueError(f"{where}: an API key must be >= {MIN_KEY_CHARS} printable characters without spaces")


def _parse_line(line: str, lineno: int, defaults: Limits) -> tuple[str, ApiKey]:
    key, *attrs = line.split()
    where = f"API keys file line {lineno}"
    _check_key(key, where)
    fields = {"name": f"key{lineno}", "rpm": str(defaults.rpm), "tpm": str(defaults.tpm)}
    for attr in attrs:
        name, sep, value = attr.partition("=")
        if not sep or name not in fields or not value:
            raise ValueError(f"{where}: expected name=..., rpm=N or tpm=N after the key; got {attr!r}")
        fields[name] = value
    try:
        limits = Limits(float(fields["rpm"]), float(fields["tpm"]))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return key, ApiKey(fields["name"], limits)


def parse_keys(text: str, defaults: Limits) -> list[tuple[str, ApiKey]]:
    """(key, ApiKey) per non-comment line of an API keys file."""
    out = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(_parse_line(line, lineno, defaults))
    return out


class KeyStore:
    """Known keys by digest. Duplicate keys or names are configuration errors."""

    def __init__(self, entries: Iterable[tuple[str, ApiKey]]) -> None:
        self._by_digest: dict[str, ApiKey] = {}
        names: set[str] = set()
        for key, api_key in entries:
            d = digest(key)
            if d in self._by_digest:
                raise ValueError(f"API key '{api_key.name}' is listed twice")
            if api_key.name in names:
                raise ValueError(f"two API keys are named '{api_key.name}'")
            self._by_digest[d] = api_key
            names.add(api_key.name)
        if not self._by_digest:
            raise ValueError("API keys are enabled but none is configured")

    @classmethod
    def load(cls, api_key: str, keys_file: str, defaults: Limits) -> KeyStore:
        entries: list[tuple[str, ApiKey]] = []
        if api_key:
            _check_key(api_key, "--api-key")
            entries.append((api_key, ApiKey("default", defaults)))
        if keys_file:
            try:
                text = Path(keys_file).read_text()
            except OSError as err:
                raise ValueError(f"cannot read API keys file {keys_file}: {err.strerror}") from None
            entries.extend(parse_keys(text, defaults))
        return cls(entries)

    def limits(self) -> dict[str, Limits]:
        return {k.name: k.limits for k in self._by_digest.values()}

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key an `Authorization` header carries, or Unauthorized."""
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key")
        found = self._by_digest.get(digest(token))
        if found is None:
            raise Unauthorized("incorrect API key provided", code="invalid_api_key")
        return found


class AuthGate:
    """aiohttp middleware: authenticate, then admit by the key's request rate."""

    def __init__(
        self, store: KeyStore, limiter: RateLimiter, public_paths: Iterable[str], respond: ErrorResponder
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.public = frozenset(public_paths)
        self._respond = respond

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in self.public:
            return await handler(request)
        try:
            key = self.store.authenticate(request.headers.get("Authorization"))
            if request.method in _LIMITED_METHODS:
                self.limiter.admit(key.name)
        except LightspeedError as err:
            log.debug("%s %s refused: %s", request.method, request.path, err.message)
            return self._respond(err)
        request[API_KEY] = key.name
        return await handler(request)

    def charge(self, request: web.Request, tokens: int) -> None:
        """After a generation: charge its prompt + completion tokens to the caller's key."""
        name = request.get(API_KEY)
        if name is not None:
            self.limiter.charge_tokens(name, tokens)
