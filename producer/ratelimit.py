"""A tenant's submit rate (`submit_rate: {per_s, burst}`): a token bucket in Redis, shared by
every producer of the deployment, so the limit holds across web processes and hosts.

Redis keeps time (`TIME` inside the script), so producers' clocks do not matter. When Redis
is unreachable the submit is allowed: execq accepts commands while Redis is down (they wait
in the store), and a limiter that failed closed would turn a broker outage into refusals.
"""

from __future__ import annotations

import logging

import redis

from producer.errors import PolicyDenied
from producer.settings import Settings
from producer.tenants import Tenant

log = logging.getLogger("execq.ratelimit")

# KEYS[1] bucket; ARGV rate/s, burst. Returns 0 when a token was taken, otherwise how many
# milliseconds until one will be there (what an HTTP 429's Retry-After says).
BUCKET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1]) or burst
local ts = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate * 1000) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return wait
"""


class SubmitRateLimiter:
    """Takes one token per submit from the tenant's bucket, or refuses with PolicyDenied."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._script = client.register_script(BUCKET_SCRIPT)
        self._settings = settings

    def take(self, tenant: Tenant) -> None:
        """Raise PolicyDenied (rule `submit_rate`) when the tenant's bucket is empty."""
        rate = tenant.submit_rate
        if rate is None:
            return
        try:
            wait_ms = self._script(
                keys=[self._settings.key("rate", tenant.name)], args=[rate.per_s, rate.burst]
            )
        except (redis.RedisError, OSError) as exc:
            log.warning("submit rate of %s not checked (Redis unreachable): %s", tenant.name, exc)
            return
        if wait_ms:
            raise PolicyDenied(
                f"tenant {tenant.name!r} submits faster than its submit_rate allows "
                f"({rate.per_s:g}/s, bursts of {rate.burst}); try again shortly",
                rule="submit_rate",
                retry_after_s=wait_ms / 1000,
            )
