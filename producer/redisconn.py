"""Redis clients from the broker URL: `redis://`, `rediss://` and `sentinel://`.

execq's own keys and channels (idempotency, submit rate, the cancel channel, the reaper's
turn, health) live on the broker's Redis, so they follow the same URL as Celery. A sentinel
URL is kombu's form, `sentinel://[:PASSWORD@]HOST:PORT[/DB];sentinel://HOST:PORT…`, plus
`?master_name=NAME` (kombu's transport option of that name) and, when the sentinels
themselves want a password, `&sentinel_password=…`. Clients then ask the sentinels for the
current master on every new connection, so a failover moves them along with Celery.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from producer.errors import ConfigError

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
QUERY_KEYS = ("master_name", "sentinel_password")


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `sentinel://` broker URL: where the sentinels are and what to ask them."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None

    def kombu_url(self) -> str:
        """The URL as kombu takes it: every address with the credentials and db, no query.

        kombu may retry with any of the `;` addresses as its main one, and reads the master's
        password and db from that one: so each carries them.
        """
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(
            f"{SENTINEL_SCHEME}://{auth}{_host(host)}:{port}/{self.db}"
            for host, port in self.sentinels
        )

    def transport_options(self, *, socket_connect_timeout: float) -> dict[str, Any]:
        """kombu's sentinel transport options (`master_name`, `sentinel_kwargs`)."""
        options: dict[str, Any] = {"master_name": self.master_name}
        if self.sentinel_password is not None:
            # Given sentinel_kwargs, redis-py no longer copies the socket options over.
            options["sentinel_kwargs"] = {
                "password": self.sentinel_password,
                "socket_connect_timeout": socket_connect_timeout,
                "socket_timeout": socket_connect_timeout,
            }
        return options


def is_sentinel(url: str) -> bool:
    """Whether `url` names Redis through sentinels."""
    return url.startswith(f"{SENTINEL_SCHEME}://")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bad(url_problem: str) -> ConfigError:
    return ConfigError(f"invalid setting EXECQ_BROKER_URL: {url_problem}")


def _shown(part: str) -> str:
    """An address fit for an error message: no password, no query (it may hold one)."""
    head = part.split("?", 1)[0]
    scheme, sep, rest = head.rpartition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def shown_url(url: str) -> str:
    """A broker URL fit for a terminal or a log: each address without credentials or query."""
    return ";".join(_shown(part.strip()) for part in url.split(";") if part.strip())


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a `sentinel://` URL; ConfigError naming the problem when it is not usable."""
    sentinels: list[tuple[str, int]] = []
    query: dict[str, str] = {}
    first: tuple[str | None, str | None, int] | None = None
    for part in url.split(";"):
        if not part.strip():
            continue
        try:
            split = urlsplit(part.strip())
            port = split.port or SENTINEL_PORT
        except ValueError as exc:
            raise _bad(f"sentinel address {_shown(part)!r} is malformed: {exc}") from None
        if split.scheme != SENTINEL_SCHEME or not split.hostname:
            raise _bad(
                f"every `;`-separated address must be sentinel://HOST:PORT, got {_shown(part)!r}"
            )
        path = split.path.strip("/")
        if path and not path.isdigit():
            raise _bad(f"the database in {_shown(part)!r} must be a number, got {path!r}")
        given = (
            unquote(split.username) if split.username else None,
            unquote(split.password) if split.password is not None else None,
            int(path) if path else None,
        )
        if first is None:
            first = (given[0], given[1], given[2] or 0)
        elif any(g is not None and g != f for g, f in zip(given, first, strict=True)):
            # One Redis behind all of them: a second password or db is a typo, not a choice.
            raise _bad("the sentinel addresses give different passwords or database numbers")
        sentinels.append((split.hostname, port))
        query.update(parse_qsl(split.query, keep_blank_values=True))
    if first is None:
        raise _bad("a sentinel:// URL needs at least one sentinel address")
    unknown = sorted(set(query) - set(QUERY_KEYS))
    if unknown:
        raise _bad(
            f"unknown sentinel URL parameter(s) {', '.join(unknown)} "
            f"(known: {', '.join(QUERY_KEYS)})"
        )
    master_name = query.get("master_name", "").strip()
    if not master_name:
        raise _bad(
            "a sentinel:// URL needs ?master_name=NAME, the name the sentinels monitor "
            "(`sentinel monitor NAME …` in sentinel.conf)"
        )
    return SentinelUrl(
        sentinels=tuple(sentinels),
        master_name=master_name,
        db=first[2],
        username=first[0],
        password=first[1],
        sentinel_password=query.get("sentinel_password"),
    )


def celery_broker(url: str, *, socket_connect_timeout: float) -> tuple[str, dict[str, Any]]:
    """The broker URL Celery gets, and the transport options to add for it."""
    if not is_sentinel(url):
        return url, {}
    target = parse_sentinel_url(url)
    return target.kombu_url(), target.transport_options(
        socket_connect_timeout=socket_connect_timeout
    )


@functools.lru_cache(maxsize=16)
def _sentinel(target: SentinelUrl, timeout_s: float) -> Sentinel:
    # One per URL and process: its connections to the sentinels are reused by every client
    # (redis-py's pools reconnect by themselves in a forked child).
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
    }
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    return Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_kwargs
    )


def redis_client(
    url: str,
    *,
    socket_connect_timeout: float | None = None,
    socket_timeout: float | None = None,
) -> redis.Redis:
    """A client for the Redis the broker URL names (for sentinel: the current master)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(
            url, socket_connect_timeout=socket_connect_timeout, socket_timeout=socket_timeout
        )
    target = parse_sentinel_url(url)
    sentinel = _sentinel(target, socket_connect_timeout or 2.0)
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.master_name,
        db=target.db,
        username=target.username,
        password=target.password,
        socket_connect_timeout=socket_connect_timeout,
        socket_timeout=socket_timeout,
    )
    return client


def async_redis_client(
    url: str,
    *,
    socket_connect_timeout: float | None = 2.0,
    socket_timeout: float | None = None,
    max_connections: int | None = None,
) -> aioredis.Redis:
    """An asyncio client for the same Redis `redis_client` reaches (sentinel included)."""
    if not is_sentinel(url):
        return aioredis.Redis.from_url(
            url,
            socket_connect_timeout=socket_connect_timeout,
            socket_timeout=socket_timeout,
            max_connections=max_connections,
        )
    target = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": socket_connect_timeout or 2.0}
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_kwargs
    )
    client: aioredis.Redis = sentinel.master_for(
        target.master_name,
        db=target.db,
        username=target.username,
        password=target.password,
        socket_connect_timeout=socket_connect_timeout,
        socket_timeout=socket_timeout,
    )
    return client


def database_of(url: str) -> int:
    """The Redis database number a broker URL names (0 when it names none)."""
    if is_sentinel(url):
        return parse_sentinel_url(url).db
    try:
        db = redis.connection.parse_url(url).get("db", 0)  # type: ignore[no-untyped-call]
    except ValueError:
        return 0  # a URL scheme redis-py does not parse (kombu's): the default database
    return int(db or 0)
