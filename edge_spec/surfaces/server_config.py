"""How `edgespec serve` listens and what it accepts (edge_spec.surfaces.server), without the server's
imports: the CLI reads these defaults at start-up."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from edge_spec.defaults import GRAMMAR_COMPILE_SECONDS
from edge_spec.types import EdgespecError

LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")  # Host header names always accepted
ANY = "*"  # as the one --allowed-host or --cors-origin: any; only with an API key


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it accepts; every default lives here (the CLI reads them)."""

    host: str = "127.0.0.1"               # address to bind; anything but loopback requires api_key
    port: int = 8080
    api_key: str | None = None            # when set, requests need "Authorization: Bearer <api_key>"
    allowed_hosts: tuple[str, ...] = ()   # Host header names accepted besides LOCAL_NAMES and the bound address
    cors_origins: tuple[str, ...] = ()    # browser origins allowed to call the API; none: CORS off
    max_body_bytes: int = 1 << 20         # request body limit (413)
    read_timeout: float = 10.0            # seconds a client may take to send a request's headers, and its body
    max_prompt_tokens: int | None = None  # prompt limit (400); None: the context size less one
    max_tokens_limit: int = 2048          # the most tokens a request may ask for, and the default
    queue: int = 8                        # requests that may wait behind the running one; more get 503
    retry_after: int = 2                  # seconds a 503 asks the client to wait
    grammar_seconds: float = GRAMMAR_COMPILE_SECONDS  # a JSON schema or grammar that takes longer to compile: 400

    def check(self) -> None:
        """EdgespecError for a value out of range, or for what would let anyone in without a key."""
        checks = [
            (0 <= self.port <= 65535, "--port must be in [0, 65535]"),
            (self.api_key is None or len(self.api_key) >= 8, "--api-key must be at least 8 characters"),
            (self.max_body_bytes >= 1024, "--max-body-bytes must be >= 1024"),
            (0 < self.read_timeout <= 3600, "--read-timeout must be in (0, 3600] seconds"),
            (all(ANY not in h or h == ANY for h in self.allowed_hosts),
             "--allowed-host takes host names, or '*' alone for any; there are no patterns"),
            (self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "--max-prompt-tokens must be >= 1"),
            (self.max_tokens_limit >= 1, "--max-tokens-limit must be >= 1"),
            (self.queue >= 0, "--queue must be >= 0"),
            (self.retry_after >= 1, "retry_after must be >= 1 second"),
            (self.grammar_seconds > 0, "grammar_seconds must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgespecError(f"invalid server setting: {message}")
        if self.api_key is None:
            self._check_keyless()

    def _check_keyless(self) -> None:
        """Without a key, the address, the Host check and CORS are all that keep others out."""
        key = "set --api-key (or EDGESPEC_API_KEY)"
        if not is_loopback(self.host):
            raise EdgespecError(f"refusing to listen on {self.host} without an API key: anyone who can reach it could "
                                f"use the model; {key}, or keep the default --host 127.0.0.1")
        if ANY in self.cors_origins:
            raise EdgespecError(f"refusing --cors-origin '*' without an API key: every web page this machine's browser "
                                f"opens could use the model; {key}, or name the origins (--cors-origin "
                                "http://localhost:3000)")
        if ANY in self.allowed_hosts:
            raise EdgespecError(f"refusing --allowed-host '*' without an API key: the Host check is what stops web "
                                f"pages that re-point their own name to this machine (DNS rebinding); {key}, or "
                                "name the hosts (--allowed-host NAME)")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
