"""Fetch an image URL on behalf of a client (`imp serve --allow-remote-images`) without
server-side request forgery, and within one overall deadline.

The host is resolved once; every address it resolves to must be public (no loopback, private,
link-local, multicast, reserved or unspecified address, also when wrapped in IPv6), and the
connection is made to that checked address, so a second DNS answer cannot swap it for an inside
one (DNS rebinding). Redirects are followed by hand, each hop checked the same way. TLS still
verifies the certificate against the host name.

The deadline covers the whole fetch (every hop's connect, request, headers and body): a host
trickling a byte every few seconds would pass any per-read timeout forever (issue 21). A watchdog
shuts the socket down when the deadline passes, so a blocked read returns at once.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable

from .images import ImageError, redact
from .limits import REMOTE_DEADLINE as DEADLINE  # seconds for a whole fetch (imp serve --remote-timeout)

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


def fetch_public(url: str, *, timeout: float = DEADLINE, max_bytes: int,
                 allow: Callable[[Address], bool] | None = None,
                 resolver: Callable[[str, int], list[Address]] = resolve) -> bytes:
    """GET `url` (http or https) if it and every redirect lead to allowed addresses; the body,
    at most max_bytes, all of it within `timeout` seconds. Any refusal or failure is an
    ImageError naming the URL (without its query string)."""
    allow = allow or is_public  # looked up now: a test may trust loopback by patching is_public
    shown = redact(url)
    deadline = time.monotonic() + timeout
    late = ImageError(f"image URL {shown} took longer than {timeout:g} s (imp serve --remote-timeout)")
    for _ in range(MAX_REDIRECTS + 1):
        try:
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            hostname = parts.hostname
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as e:  # "http://[::1/x", a port out of range, ...
            raise ImageError(f"image URL {shown} is malformed ({e})") from None
        if scheme not in ("http", "https") or not hostname:
            raise ImageError(f"image URL {shown}: only http(s) URLs with a host can be fetched")
        try:
            addresses = _within(deadline, resolver, hostname, port)
        except TimeoutError:
            raise late from None
        except ValueError:  # "http://[evil]:1/x": not an address, nor a name
            raise ImageError(f"image URL {shown}: bad host {redact(hostname, 60)}") from None
        except (OSError, UnicodeError) as e:
            raise ImageError(f"cannot fetch image URL {shown}: cannot resolve {redact(hostname, 60)} ({e})") from None
        if not addresses or not all(allow(ip) for ip in addresses):
            raise ImageError(f"image URL {shown}: {redact(hostname, 60)} is not a public address; refused")
        left = deadline - time.monotonic()
        if left <= 0:
            raise late
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(hostname, port, addresses[0], left)
        watchdog = threading.Timer(left, _cut, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"User-Agent": "imp", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in REDIRECTS and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise ImageError(f"image URL {shown} returned HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"image URL {shown} is larger than {max_bytes:,} bytes")
            chunks, got = [], 0
            while got <= max_bytes:  # one byte over the limit is enough to know
                chunk = response.read1(min(1 << 16, max_bytes + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                if time.monotonic() > deadline:
                    raise late
            data = b"".join(chunks)
        except (OSError, http.client.HTTPException, ValueError) as e:
            if time.monotonic() >= deadline:
                raise late from None
            raise ImageError(f"cannot fetch image URL {shown}: {e or type(e).__name__}") from None
        finally:
            watchdog.cancel()
            conn.close()
        if time.monotonic() > deadline:
            raise late
        if len(data) > max_bytes:
            raise ImageError(f"image URL {shown} is larger than {max_bytes:,} bytes")
        if not data:
            raise ImageError(f"image URL {shown} returned no data")
        return data
    raise ImageError(f"image URL {shown}: more than {MAX_REDIRECTS} redirects")


def _within(deadline: float, fn, *args):
    """fn(*args) in a helper thread, given up (TimeoutError) at the deadline: a name lookup has
    no timeout of its own (the thread then ends when the system resolver gives up)."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as e:  # handed to the caller
            box.append((False, e))

    thread = threading.Thread(target=run, name="imp-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not box:
        raise TimeoutError
    ok, value = box[0]
    if ok:
        return value
    raise value


def _cut(conn: http.client.HTTPConnection) -> None:
    """The deadline passed: wake the fetch's blocked read (it then fails and says so)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
