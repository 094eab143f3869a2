"""URL safety (SSRF) for URLs a caller hands us to open: only allowed schemes; every
address a host resolves to must be public unless an allowlist names the host or its
network; HTTP redirects are followed by hand and each hop checked the same way; file paths
only under a configured root.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "http", "https"})
HTTP_SCHEMES = frozenset({"http", "https"})

# Ranges no stream of the public internet lives in. ``is_private`` etc. cover most; the rest
# are named: CGNAT (shared address space) and the cloud metadata addresses.
_REFUSED = [
    ipaddress.ip_network(n)
    for n in (
        "100.64.0.0/10",  # CGNAT
        "169.254.169.254/32",  # AWS, GCP, Azure, OpenStack metadata
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
    )
]


class UnsafeURL(Exception):
    """The URL is refused; ``str(exc)`` says why, for the caller."""


class URLTimedOut(UnsafeURL):
    """Checking the URL took longer than the policy's deadline: it may answer later."""


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is not a public one, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_problem(address.ipv4_mapped)
    for network in _REFUSED:
        if address in network:
            return "a cloud metadata or carrier-grade NAT address"
    checks = (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_unspecified", "the unspecified address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    )
    for attribute, reason in checks:
        if getattr(address, attribute):
            return reason
    if not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class URLPolicy:
    allowed_hosts: tuple[str, ...] = ()
    file_root: Path | None = None
    max_redirects: int = 5
    timeout: float = 10.0
    deadline: float = 10.0
    """Seconds the whole check may take (resolving, every redirect): a server that trickles
    its headers keeps each read under ``timeout`` and would otherwise hold us forever."""
    settings_prefix: str = "C4C_"
    """Of the settings named in refusals (``<prefix>ALLOWED_HOSTS``, ``<prefix>FILE_ROOT``),
    so the operator knows what would allow the URL."""

    @property
    def allowed_networks(self) -> list[IPNetwork]:
        networks = []
        for entry in self.allowed_hosts:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue  # a host name, matched by name
        return networks

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in {h.lower().rstrip(".") for h in self.allowed_hosts}

    def address_allowed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allowed_networks)


def addresses_of(host: str, port: int | None) -> list[IPAddress]:
    """Every A/AAAA record of ``host`` (or the literal address), or :class:`UnsafeURL`.
    Blocking: from a thread (FFmpeg's, or :func:`resolve`'s)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"the host {host!r} does not resolve ({exc.strerror})") from exc
    except UnicodeError as exc:  # IDNA refuses the name, e.g. a label over 63 characters
        raise UnsafeURL(f"the host {host!r} is not a valid name ({exc})") from exc
    addresses: list[IPAddress] = []
    for _, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnsafeURL(f"the host {host!r} has no address")
    return addresses


async def resolve(host: str, port: int | None) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return await asyncio.to_thread(addresses_of, host, port)


def check_addresses(host: str, addresses: list[IPAddress], policy: URLPolicy) -> None:
    """:class:`UnsafeURL` unless ``host`` or each of its ``addresses`` is allowed."""
    if policy.host_allowed(host):
        return
    for address in addresses:
        if policy.address_allowed(address):
            continue
        problem = address_problem(address)
        if problem is not None:
            shown = host if host == str(address) else f"{host!r} ({address})"
            setting = f"{policy.settings_prefix}ALLOWED_HOSTS"
            raise UnsafeURL(f"the host {shown} is {problem}; add it to {setting} to allow it")


async def check_host(host: str, port: int | None, policy: URLPolicy) -> None:
    if not policy.host_allowed(host):
        check_addresses(host, await resolve(host, port), policy)


def check_file(url: str, policy: URLPolicy) -> Path:
    parts, _ = split_url(url)
    if parts.netloc not in ("", "localhost"):
        raise UnsafeURL("file URLs must name a local path (file:///...)")
    if policy.file_root is None:
        raise UnsafeURL(
            f"file URLs are disabled (set {policy.settings_prefix}FILE_ROOT to allow a folder)"
        )
    root = policy.file_root.resolve()
    local = unquote(parts.path)
    if "\x00" in local:
        raise UnsafeURL("the file path holds a NUL character")
    path = Path(local).resolve()
    if not path.is_relative_to(root):
        raise UnsafeURL(f"file URLs must point under the configured root {root}")
    if not path.is_file():
        raise UnsafeURL("no such file under the configured root")
    return path


def split_url(url: str) -> tuple[SplitResult, int | None]:
    """The URL's parts and port, or :class:`UnsafeURL` when it does not parse."""
    try:
        parts = urlsplit(url)
        return parts, parts.port
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from exc


def _split(url: str, schemes: Iterable[str]) -> tuple[str, str, int | None]:
    parts, port = split_url(url)
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        allowed = ", ".join(sorted(schemes))
        raise UnsafeURL(f"the scheme {scheme or '(none)'!r} is not allowed (allowed: {allowed})")
    if not parts.hostname:
        raise UnsafeURL("the URL has no host")
    return scheme, parts.hostname, port


async def check_url(url: str, policy: URLPolicy, *, client: httpx.AsyncClient | None = None) -> str:
    """The URL to open (after redirects for HTTP), or :class:`UnsafeURL` with the reason."""
    if split_url(url)[0].scheme.lower() == "file":
        return check_file(url, policy).as_uri()
    scheme, host, port = _split(url, NETWORK_SCHEMES)
    try:
        async with asyncio.timeout(policy.deadline):
            await check_host(host, port, policy)
            if scheme not in HTTP_SCHEMES:
                return url
            return await _follow_redirects(url, policy, client)
    except TimeoutError:
        raise URLTimedOut(f"the URL did not answer within {policy.deadline:g} s") from None


async def _follow_redirects(url: str, policy: URLPolicy, client: httpx.AsyncClient | None) -> str:
    """Ask the server ourselves, one hop at a time, so each redirect target is checked
    before anything connects to it; the opener then gets the final URL."""
    own_client = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout)
    try:
        for _ in range(policy.max_redirects + 1):
            try:
                async with client.stream("GET", url) as response:
                    location = response.headers.get("location")
                    redirect = response.is_redirect and location
            except httpx.HTTPError:
                # Unreachable now (a camera offline): nothing redirects us anywhere. The worker
                # checks again before every connection.
                return url
            if not redirect:
                return url
            assert location is not None
            url = urljoin(url, location)
            _, host, port = _split(url, HTTP_SCHEMES)
            try:
                await check_host(host, port, policy)
            except UnsafeURL as exc:
                raise UnsafeURL(f"redirected to {url}: {exc}") from exc
        raise UnsafeURL(f"more than {policy.max_redirects} redirects")
    finally:
        if own_client:
            await client.aclose()
