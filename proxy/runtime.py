"""Runtime: everything one policy load compiles to, swapped atomically on reload.

The handler reads ``app[RUNTIME]`` once per request and uses that object until the request
ends, so a reload never mixes two policies inside one request and in-flight requests finish
on the chain they started with.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.chain import Chain
from proxy.context import Route
from proxy.policy import LoadedPolicy
from proxy.upstream import ProviderClient

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True, frozen=True)
class Runtime:
    loaded: LoadedPolicy
    chain: Chain
    routes: dict[str, Route]
    providers: dict[str, ProviderClient]
    max_body: int
    trusted_proxies: tuple[Network, ...]
    default_feature: str | None

    @classmethod
    def build(cls, loaded: LoadedPolicy, chain: Chain) -> Runtime:
        p = loaded.policy
        return cls(
            loaded=loaded,
            chain=chain,
            routes=p.routes(),
            providers={n: ProviderClient.build(n, pr) for n, pr in p.providers.items()},
            max_body=p.listen.max_body_bytes,
            trusted_proxies=tuple(
                ipaddress.ip_network(n, strict=False) for n in p.listen.trusted_proxies
            ),
            default_feature=p.default_feature,
        )

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str:
        """The caller's address: the peer, or X-Forwarded-For's nearest untrusted hop when the
        peer is a trusted proxy (a client cannot spoof its IP through an untrusted peer)."""
        peer = peer or "unknown"
        if not self.trusted_proxies or not forwarded_for or not self._trusted(peer):
            return peer
        for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
            if not self._trusted(hop):
                return hop
        return peer

    def _trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)
