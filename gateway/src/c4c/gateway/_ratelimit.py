"""Rate limits: a token bucket per caller (key, user or IP) and a daily quota per API key,
kept by a small backend interface: in this process's memory by default (so per process:
with several workers or replicas each has its own counts), or in the gateway's database
(:class:`DatabaseBackend`: one atomic upsert per check, shared by every replica — use
PostgreSQL for that).

Answers carry the IETF ``RateLimit-Policy`` and ``RateLimit`` fields
(draft-ietf-httpapi-ratelimit-headers): ``"burst";q=100;w=5`` is a bucket of 100 refilled
over 5 s, ``"daily";q=1000;w=86400`` a quota per UTC day; ``r`` is what remains, ``t`` the
seconds until it is whole again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from c4c.gateway import repository
from c4c.shared.db import Database

DAY = 86400
_MAX_BUCKETS = 100_000


@dataclass(frozen=True)
class Policy:
    name: str
    quota: int
    window: float  # seconds

    def field(self) -> str:
        return f'"{self.name}";q={self.quota};w={max(1, round(self.window))}'


@dataclass(frozen=True)
class Decision:
    policy: Policy
    allowed: bool
    remaining: int
    reset: int  # seconds until the quota is whole again
    retry_after: int  # seconds until a refused caller may try again; 0 when allowed

    def field(self) -> str:
        return f'"{self.policy.name}";r={self.remaining};t={self.reset}'


class RateLimitBackend(Protocol):
    async def take(self, key: str, policy: Policy, now: float) -> Decision:
        """One token from ``key``'s bucket (``quota`` tokens refilled over ``window``)."""
        ...

    async def count(self, key: str, policy: Policy, now: float) -> Decision:
        """One request in ``key``'s current fixed window of ``window`` seconds (UTC-aligned)."""
        ...


class InMemoryBackend:
    """This process's memory: exact for one gateway, per replica for several."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)
        self._windows: dict[str, tuple[int, int]] = {}  # key → (window start, count)

    async def take(self, key: str, policy: Policy, now: float) -> Decision:
        rate = policy.quota / policy.window
        tokens, at = self._buckets.get(key, (float(policy.quota), now))
        tokens = min(float(policy.quota), tokens + max(0.0, now - at) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        if len(self._buckets) >= _MAX_BUCKETS and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens, now)
        return _bucket_decision(policy, allowed, tokens)

    def _prune(self, now: float) -> None:
        """Forget buckets idle long enough to be full again: they are as good as new."""
        for key, (_, at) in list(self._buckets.items()):
            if now - at > DAY:
                del self._buckets[key]
        if len(self._buckets) >= _MAX_BUCKETS:
            self._buckets.clear()

    async def count(self, key: str, policy: Policy, now: float) -> Decision:
        start = _window_start(policy, now)
        window_start, used = self._windows.get(key, (start, 0))
        if window_start != start:
            used = 0
        allowed = used < policy.quota
        if allowed:
            used += 1
        self._windows[key] = (start, used)
        return _window_decision(policy, allowed, used, start, now)


class DatabaseBackend:
    """The gateway's database: every replica sees the same buckets and windows.

    Rows that no longer matter are deleted by :meth:`prune`, which the gateway runs in the
    background (never inside a request): a bucket idle for its whole window (full again: as
    good as none) and a daily window that has ended (the next count starts anew)."""

    def __init__(self, db: Database, *, prune_batch: int = 1000) -> None:
        self.db = db
        self.prune_batch = prune_batch

    async def take(self, key: str, policy: Policy, now: float) -> Decision:
        rate = policy.quota / policy.window
        async with self.db.sessions() as session, session.begin():
            tokens, allowed = await repository.take_token(
                session, key, quota=float(policy.quota), rate=rate, now=now
            )
        return _bucket_decision(policy, allowed, tokens)

    async def count(self, key: str, policy: Policy, now: float) -> Decision:
        start = _window_start(policy, now)
        async with self.db.sessions() as session, session.begin():
            used = await repository.count_request(session, key, quota=policy.quota, start=start)
        allowed = used <= policy.quota
        return _window_decision(policy, allowed, min(used, policy.quota), start, now)

    async def prune(self, now: float, *, bucket_window: float) -> bool:
        """Delete up to ``prune_batch`` buckets idle for ``bucket_window`` seconds and as many
        daily windows that have ended, each in a short transaction of its own; whether a
        batch was full (more may be left)."""
        async with self.db.sessions() as session, session.begin():
            buckets = await repository.prune_buckets(
                session, idle_before=now - bucket_window, limit=self.prune_batch
            )
        async with self.db.sessions() as session, session.begin():
            windows = await repository.prune_windows(
                session, started_before=int(now // DAY * DAY), limit=self.prune_batch
            )
        return max(buckets, windows) >= self.prune_batch


def _bucket_decision(policy: Policy, allowed: bool, tokens: float) -> Decision:
    """What a take left: ``tokens`` in the bucket after it."""
    rate = policy.quota / policy.window
    return Decision(
        policy,
        allowed,
        remaining=int(tokens),
        reset=math.ceil((policy.quota - tokens) / rate),
        retry_after=0 if allowed else max(1, math.ceil((1 - tokens) / rate)),
    )


def _window_start(policy: Policy, now: float) -> int:
    return int(now // policy.window * policy.window)


def _window_decision(policy: Policy, allowed: bool, used: int, start: int, now: float) -> Decision:
    reset = max(1, math.ceil(start + policy.window - now))
    return Decision(
        policy,
        allowed,
        remaining=policy.quota - used,
        reset=reset,
        retry_after=0 if allowed else reset,
    )


class RateLimiter:
    def __init__(self, backend: RateLimitBackend, *, per_second: float, burst: int) -> None:
        self.backend = backend
        # The bucket as an IETF policy: ``burst`` requests refilled over ``burst/rate`` s.
        self.burst = Policy("burst", burst, burst / per_second) if per_second else None

    async def check(self, caller: str, *, daily_quota: int | None, now: float) -> list[Decision]:
        """The caller's bucket, then (only for what it lets through) the daily quota."""
        decisions: list[Decision] = []
        if self.burst is not None:
            decisions.append(await self.backend.take(f"bucket:{caller}", self.burst, now))
            if not decisions[-1].allowed:
                return decisions
        if daily_quota is not None:
            daily = Policy("daily", daily_quota, DAY)
            decisions.append(await self.backend.count(f"daily:{caller}", daily, now))
        return decisions


def rate_limit_headers(decisions: list[Decision]) -> dict[str, str]:
    """``RateLimit-Policy`` with every policy; ``RateLimit`` with the tightest one (and
    ``Retry-After`` when a request was refused)."""
    if not decisions:
        return {}
    refused = [d for d in decisions if not d.allowed]
    tightest = refused[0] if refused else min(decisions, key=lambda d: d.remaining)
    fields = {
        "RateLimit-Policy": ", ".join(d.policy.field() for d in decisions),
        "RateLimit": tightest.field(),
    }
    if refused:
        fields["Retry-After"] = str(tightest.retry_after)
    return fields
