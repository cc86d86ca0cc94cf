"""kombu's Redis transport, with one redis-py client per channel instead of one per call.

kombu's Redis channel builds a new `redis.Redis` for every publish, delivery and ack that
does not pass one in (`Channel._create_client`), and building one costs more CPU than the
command it sends: redis-py fills its table of response callbacks, a few hundred entries, for
each client. Measured in a producer's submit loop, 13 % of a submit's CPU went there.

The client is stateless above its connection pool (which the channel owns already and
redis-py makes thread-safe), so one per channel serves every call the channel makes. Clients
for the asynchronous side (the worker's BRPOP and pub/sub loop) are still made by kombu as
before: they hold a connection of their own on purpose.

Used by execq's Celery app only (`make_celery` passes `amqp=AMQP`): other kombu users in
the same process keep kombu's own classes.
"""

from __future__ import annotations

from typing import Any

from celery.app import amqp as celery_amqp
from kombu import connection as kombu_connection
from kombu.connection import Connection as KombuConnection
from kombu.transport import redis as kombu_redis


class _OneClient:
    """Mixed into kombu's Redis channels: `_create_client` returns one client per channel."""

    _execq_client: Any = None
    _pool: Any

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        client = self._execq_client
        # The channel drops its pool after a fork or on close: a client follows its pool.
        if client is None or client.connection_pool is not self._pool:
            client = self._execq_client = super()._create_client(asynchronous=False)  # type: ignore[misc]
        return client


class Channel(_OneClient, kombu_redis.Channel):
    """kombu's Redis channel, one client per channel."""


class SentinelChannel(_OneClient, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel, one client per channel."""


class Transport(kombu_redis.Transport):
    """`redis://` (and `rediss://`) with one client per channel."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """`sentinel://` with one client per channel."""

    Channel = SentinelChannel


_FASTER: dict[type, type] = {
    kombu_redis.Transport: Transport,
    kombu_redis.SentinelTransport: SentinelTransport,
}


class _Swapped:
    """Mixed into kombu's connections: kombu's Redis transports become the ones above.

    Swapped where the class is resolved, not in the URL or `broker_transport`: the
    connection still says `redis://…` wherever it is shown or parsed (the worker's banner,
    Flower's broker page).
    """

    def get_transport_cls(self) -> Any:
        cls = super().get_transport_cls()  # type: ignore[misc]
        return _FASTER.get(cls, cls)


class Connection(_Swapped, KombuConnection):
    """A kombu connection on the transports above, and so are its pool's connections."""

    def Pool(self, limit: int | None = None, **kwargs: Any) -> ConnectionPool:
        return ConnectionPool(self, limit=limit, **kwargs)  # type: ignore[no-untyped-call]


class PooledConnection(_Swapped, kombu_connection.PooledConnection):
    """A pooled connection on the transports above."""


class ConnectionPool(kombu_connection.ConnectionPool):
    """kombu's pool of connections, handing out the connections above."""

    def new(self) -> PooledConnection:
        info = dict(self.connection._info(resolve=False))
        return PooledConnection(self, **info)  # type: ignore[no-untyped-call]


class AMQP(celery_amqp.AMQP):  # type: ignore[misc]
    """Celery's AMQP helper with the connection above (`Celery(amqp=...)`)."""

    Connection = Connection
    BrokerConnection = Connection
