"""Leases: a pool process renews the lease of the command it runs and hears cancel requests.

One thread per pool process (started after fork). It renews every third of the lease, so a
renewal can be missed twice before the reaper presumes the worker dead. Cancel requests
arrive over Redis pub/sub for speed, but Redis is untrusted: the store's cancel flag is
checked before anything is killed, and re-read on every renewal in case a message was lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis

from producer import logs
from producer.redisconn import redis_client
from producer.store.repository import Store

log = logging.getLogger("execq.lease")


@dataclass
class _Held:
    command_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    pid: int | None = None
    lost: bool = False


class LeaseKeeper:
    """Keeps the lease of the one command a pool process runs at a time."""

    def __init__(
        self,
        *,
        store: Store,
        redis_url: str,
        channel: str,
        tenant: str,
        owner: str,
        lease_s: float,
    ) -> None:
        self.store = store
        self.redis_url = redis_url
        self.tenant = tenant
        self.channel = channel
        self.owner = owner
        self.lease_s = lease_s
        self.renew_every_s = max(lease_s / 3, 0.2)
        self._held: _Held | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the renewal thread (once, in the process that runs commands)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="execq-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the renewal thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    @contextmanager
    def hold(self, command_id: str) -> Iterator[threading.Event]:
        """While inside, the lease of `command_id` is renewed; yields its cancel event."""
        self.start()
        held = _Held(command_id)
        with self._lock:
            self._held = held
        try:
            yield held.cancel
        finally:
            with self._lock:
                self._held = None

    def lost(self, command_id: str) -> bool:
        """Whether the lease of `command_id` was found taken away (the reaper presumed us dead)."""
        with self._lock:
            return (
                self._held is not None and self._held.command_id == command_id and self._held.lost
            )

    def set_pid(self, pid: int) -> None:
        """Record the child's pid (= its process group) with the next renewal.

        Not written at once: a command that ends before its first renewal costs no extra write.
        """
        with self._lock:
            if self._held is not None:
                self._held.pid = pid

    def _loop(self) -> None:
        pubsub: redis.client.PubSub | None = None
        next_connect = 0.0
        last_renew = time.monotonic()
        unheard = False  # a cancel may have been announced while nobody listened
        while not self._stop.is_set():
            if pubsub is None and time.monotonic() >= next_connect:
                pubsub = self._subscribe()
                if pubsub is None:
                    next_connect = time.monotonic() + 5
                else:
                    unheard = True
            message = None
            if pubsub is not None:
                try:
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                except (redis.RedisError, OSError) as exc:
                    log.warning("cancel channel lost, relying on lease renewals: %s", exc)
                    _close(pubsub)
                    pubsub, next_connect = None, time.monotonic() + 5
            else:
                self._wake.wait(0.2)
            self._wake.clear()
            with self._lock:
                held = self._held
            if held is None:
                last_renew = time.monotonic()
                continue
            heard = message is not None and _text(message.get("data")) == held.command_id
            # Once (re)subscribed, the store says whether a cancel came while this thread was
            # not listening (at start, or while Redis was away): it is not left to the renewal.
            heard, unheard = heard or unheard, False
            # This thread's log lines name the command they are about, like the task's.
            with logs.command_context(held.command_id, tenant=self.tenant):
                if heard and self._check_cancel(held):
                    continue
                if time.monotonic() - last_renew >= self.renew_every_s:
                    self._renew(held)
                    last_renew = time.monotonic()

    def _check_cancel(self, held: _Held) -> bool:
        try:
            if self.store.cancel_requested(held.command_id):
                log.info("cancel requested for command %s", held.command_id)
                held.cancel.set()
                return True
        except Exception as exc:
            log.warning("could not read cancel flag of %s: %s", held.command_id, exc)
        return False

    def _renew(self, held: _Held) -> None:
        try:
            state = self.store.renew_lease(
                held.command_id, owner=self.owner, lease_s=self.lease_s, pid=held.pid
            )
        except Exception as exc:
            # The store is briefly unreachable: keep running, the lease has slack for it.
            log.warning("lease renewal of %s failed: %s", held.command_id, exc)
            return
        if state is None:
            log.error("lease of command %s was taken away: stopping it", held.command_id)
            held.lost = True
            held.cancel.set()
        elif state:
            log.info("cancel requested for command %s", held.command_id)
            held.cancel.set()

    def _subscribe(self) -> redis.client.PubSub | None:
        try:
            client = redis_client(self.redis_url, socket_connect_timeout=2)
            pubsub: redis.client.PubSub = client.pubsub()  # type: ignore[no-untyped-call]
            pubsub.subscribe(self.channel)
            return pubsub
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot subscribe to %s (will retry): %s", self.channel, exc)
            return None


def _text(data: object) -> str | None:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data if isinstance(data, str) else None


def _close(pubsub: redis.client.PubSub) -> None:
    try:
        pubsub.close()
    except Exception:  # already broken; nothing to release
        log.debug("closing a broken pubsub failed", exc_info=True)
