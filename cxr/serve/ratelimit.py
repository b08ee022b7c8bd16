"""Per-client request rate limits for the gateway, with the `limits` library.

A limit is a string `limits` understands ("20/second", "1000/hour", several joined by ";"), or `none`.
Counting uses the sliding window counter strategy in process memory: two counters per client and limit,
dropped once their windows have passed, so memory grows with the clients active in the last two windows,
never with the traffic or the limit's size. The client is the peer address (IPv6 addresses by their /64,
which one host usually owns whole); behind proxies named as trusted, it is the nearest untrusted address of
`X-Forwarded-For`, which is otherwise ignored.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_RATE_LIMIT = "20/second"
EXEMPT = frozenset({"/ping", "/metrics"})  # health checks and scrapes are never refused
IPV6_PREFIX = 64


def parse_rate_limit(text: str | None) -> list[RateLimitItem]:
    """The limits of a string such as "20/second" or "20/second;1000/hour"; none for None or "none"."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    try:
        items = parse_many(text)
    except ValueError as error:
        raise ValueError(f'rate limit must look like "20/second" or "none", got {text!r}') from error
    if any(item.amount < 1 for item in items):
        raise ValueError(f"a rate limit must allow at least one request, got {text!r}")
    return items


def parse_networks(texts: Iterable[str]) -> list[Network]:
    """Addresses or networks ("10.0.0.5", "10.0.0.0/8", "fd00::/8") of trusted proxies."""
    try:
        return [ipaddress.ip_network(text.strip(), strict=False) for text in texts]
    except ValueError as error:
        raise ValueError(f"trusted proxies must be IP addresses or networks: {error}") from error


class ClientRateLimiter:
    """Per-client limits: `retry_after(request)` is None when the request may pass, else seconds to wait."""

    def __init__(self, text: str | None, trusted_proxies: Iterable[str] = ()):
        self.items = parse_rate_limit(text)
        self.trusted = parse_networks(trusted_proxies)
        self.storage = MemoryStorage()
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)

    @property
    def description(self) -> str:
        """The limits in words, e.g. "20 per 1 second", or "none"."""
        return "; ".join(str(item) for item in self.items) or "none"

    def client(self, peer: str | None, forwarded: str | None) -> str:
        """The key a request is counted under."""
        address = _address(peer)
        if address is None:
            return peer or "unknown"
        if forwarded and self._trusted(address):
            for hop in reversed(forwarded.split(",")):
                hop_address = _address(hop.strip())
                if hop_address is None:
                    break
                address = hop_address
                if not self._trusted(address):
                    break
        if isinstance(address, ipaddress.IPv6Address):
            return str(ipaddress.ip_network(f"{address}/{IPV6_PREFIX}", strict=False))
        return str(address)

    def retry_after(self, request: web.Request) -> int | None:
        """Count the request against its client's limits: None if it passes, else whole seconds to wait."""
        key = self.client(request.remote, request.headers.get("X-Forwarded-For"))
        for item in self.items:
            if not self.limiter.hit(item, key):
                reset = self.limiter.get_window_stats(item, key).reset_time
                return max(1, math.ceil(reset - time.time()))
        return None

    def _trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted)


def rate_limit_middleware(limiter: ClientRateLimiter, on_refused: Callable[[str], None]) -> Middleware:
    """aiohttp middleware: a request over its client's limit gets 429 with Retry-After, before any work;
    `on_refused` is told the route (for metrics). /ping and /metrics are exempt."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not limiter.items or request.path in EXEMPT:
            return await handler(request)
        wait = limiter.retry_after(request)
        if wait is None:
            return await handler(request)
        resource = request.match_info.route.resource
        on_refused(resource.canonical if resource is not None else "unmatched")
        message = f"rate limit {limiter.description} exceeded for this client; retry in {wait} s"
        return web.json_response({"error": message}, status=429, headers={"Retry-After": str(wait)})

    return middleware


def _address(text: str | None) -> Address | None:
    """The address of a peer or forwarded hop; IPv4-mapped IPv6 addresses as IPv4."""
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
