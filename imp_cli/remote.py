"""Fetch an image URL on behalf of a client (`imp serve --allow-remote-images`) without
server-side request forgery.

The host is resolved once; every address it resolves to must be public (no loopback, private,
link-local, multicast, reserved or unspecified address, also when wrapped in IPv6), and the
connection is made to that checked address, so a second DNS answer cannot swap it for an inside
one (DNS rebinding). Redirects are followed by hand, each hop checked the same way. TLS still
verifies the certificate against the host name.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import urllib.parse
from typing import Callable

from .images import ImageError

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(ip: Address) -> bool:
    """True for an address a server may fetch from on a client's behalf."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is that IPv4 address
            return is_public(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public(embedded):
            return False
    return ip.is_global and not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def resolve(host: str, port: int) -> list[Address]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a fixed, already-checked address; Host header and URL keep the name."""

    def __init__(self, host: str, port: int, ip: Address, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self._ip), self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: Address, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((str(self._ip), self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_public(url: str, *, timeout: float = 30, max_bytes: int,
                 allow: Callable[[Address], bool] = is_public,
                 resolver: Callable[[str, int], list[Address]] = resolve) -> bytes:
    """GET `url` (http or https) if it and every redirect lead to allowed addresses; the body,
    at most max_bytes. Any refusal or failure is an ImageError naming the URL."""
    original = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(f"image URL {original}: only http(s) URLs with a host can be fetched")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            addresses = resolver(parts.hostname, port)
        except ValueError:
            raise ImageError(f"image URL {original}: bad port") from None
        except OSError as e:
            raise ImageError(f"cannot fetch image URL {original}: cannot resolve {parts.hostname} ({e})") from None
        if not addresses or not all(allow(ip) for ip in addresses):
            raise ImageError(f"image URL {original}: {parts.hostname} is not a public address; refused")
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(parts.hostname, port, addresses[0], timeout)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"User-Agent": "imp", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in REDIRECTS and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise ImageError(f"image URL {original} returned HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"image URL {original} is larger than {max_bytes:,} bytes")
            data = response.read(max_bytes + 1)
        except (OSError, http.client.HTTPException) as e:
            raise ImageError(f"cannot fetch image URL {original}: {e or type(e).__name__}") from None
        finally:
            conn.close()
        if len(data) > max_bytes:
            raise ImageError(f"image URL {original} is larger than {max_bytes:,} bytes")
        if not data:
            raise ImageError(f"image URL {original} returned no data")
        return data
    raise ImageError(f"image URL {original}: more than {MAX_REDIRECTS} redirects")
