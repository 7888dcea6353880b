"""Which web addresses the app may fetch: http and https only, and (unless
`app.allow_private_urls`) only hosts on the public internet.

A visitor's URL must not make the server fetch from itself, its cloud's metadata service
(169.254.169.254) or the LAN behind it (server-side request forgery). `check_url` checks the
scheme and every address the host resolves to; `guard_connections` installs the same check on
every connection a process opens, so that redirects, the media URLs an extractor returns and a
host whose DNS answer changes between the check and the download are refused too. It is meant
for the child process that runs yt-dlp (`whisper_ft.youtube`), never for the app itself.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from urllib.parse import urlparse

SCHEMES = ("http", "https")


class URLRefused(ValueError):
    """A URL the app will not fetch; the message says why."""


def check_scheme(url: str) -> str:
    """Return the stripped URL if it is an http(s) URL with a host, else raise URLRefused."""
    url = (url or "").strip()
    if not url:
        raise URLRefused("paste the URL of a video (YouTube or any site yt-dlp supports)")
    try:
        parsed = urlparse(url)  # raises for a bracket left open ("http://[::1")
        parsed.port  # raises for a port that is not a number or out of range
    except ValueError as e:
        raise URLRefused(f"not a web address: {url[:200]!r} ({e})") from e
    if parsed.scheme.lower() not in SCHEMES or not parsed.hostname:
        raise URLRefused(f"not a web address: {url[:200]!r}. Only http:// and https:// URLs are accepted "
                         "(file:// URLs and local paths are refused; upload files in the File tab)")
    return url


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix: the last 32 bits are an IPv4 address


def address_problem(address: str) -> str | None:
    """Why an IP address is not on the public internet ("loopback", "private", ...), or None if it is."""
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if ip.version == 6:  # an IPv4 address inside (::ffff:, 6to4, NAT64) is the one that counts
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None
        ip = ip.ipv4_mapped or ip.sixtofour or nat64 or ip
    for problem in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{problem}"):
            return problem.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def resolve(host: str, port: int | None = None) -> list[str]:
    """Every IP address `host` resolves to (a literal IP resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port or 80, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise URLRefused(f"the host {host!r} could not be found") from e
    return sorted({info[4][0] for info in infos})


def check_host(host: str, port: int | None = None) -> None:
    """Raise URLRefused unless every address of `host` is on the public internet."""
    for address in resolve(host, port):
        problem = address_problem(address)
        if problem:
            raise URLRefused(refused_message(host if host == address else f"{host} ({address})", problem))


def refused_message(where: str, problem: str) -> str:
    return (f"{where} is not on the public internet ({problem} address): the page does not fetch from the "
            "server's own machine or network (app.allow_private_urls enables it for local use)")


def check_url(url: str, allow_private: bool = False) -> str:
    """Return the stripped URL if it may be fetched, else raise URLRefused."""
    url = check_scheme(url)
    if not allow_private:
        parsed = urlparse(url)
        check_host(parsed.hostname, parsed.port)
    return url


class ConnectionGuard:
    """Refuses, in this process, every connection to an address that is not public; keeps the
    refusals so that the error the caller finally sees can say which address was refused."""

    def __init__(self):
        self.refused: list[str] = []

    def __call__(self, event: str, args: tuple) -> None:
        if event != "socket.connect":
            return
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        problem = address_problem(address[0])
        if problem:
            self.refused.append(refused_message(address[0], problem))
            raise ConnectionRefusedError(self.refused[-1])


def guard_connections() -> ConnectionGuard:
    """Check every socket this process connects from now on (an audit hook: it covers whatever library
    opens the connection, and cannot be removed, hence only in a child process of its own)."""
    guard = ConnectionGuard()
    sys.addaudithook(guard)
    return guard
