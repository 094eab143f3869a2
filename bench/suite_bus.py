"""Bus throughput: events/s published with confirms and consumed end to end, for both
adapters, against a bare aio-pika loop doing the same work on the same broker in the same
run.

Every variant gets the same workload: ``n`` events of the same JSON body, at most ``WINDOW``
publishes in flight, a consumer with prefetch ``PREFETCH`` acking each message by hand. The
clock runs from the first publish until every publish is confirmed and every event consumed.
Rounds alternate the order of the variants; each figure is the median over the rounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from bench._core import Context, Result, ServiceUnavailable, median
from c4c.shared.bus import BusOptions, CloudEvent, EventBus, InProcessBus, RabbitMQBus, new_event
from c4c.shared.bus._rabbitmq import dead_letter_queue

SUITE = "bus"
WINDOW = 100  # publishes in flight
PREFETCH = 64  # BusOptions' default
ROUTING_KEY = "bench.observation.created"
PATTERN = "bench.observation.*"
ROUND_TIMEOUT = 120.0
EVENTS, ROUNDS = 5000, 5
QUICK_EVENTS, QUICK_ROUNDS = 500, 1
TARGET_RATIO = 0.8  # of the bare aio-pika rate
BARE, RABBITMQ, INPROCESS = "bare aio-pika", "rabbitmq", "in-process"

log = logging.getLogger("bench.bus")


@dataclass(frozen=True)
class Workload:
    events: list[CloudEvent]
    # What a bare-aio-pika application would serialise: the same fields, compact JSON.
    payloads: list[dict[str, Any]]

    @property
    def n(self) -> int:
        return len(self.events)

    @classmethod
    def make(cls, n: int) -> Workload:
        events = [
            new_event(
                "bench",
                ROUTING_KEY,
                {
                    "id": f"obs-{i:06d}",
                    "user": "bench-user-0001",
                    "lat": 41.38 + i * 1e-6,
                    "lon": 2.17 - i * 1e-6,
                    "taxon": {"id": 53213, "name": "Quercus ilex", "rank": "species"},
                    "photos": [f"https://example.org/photos/{i}-{k}.jpg" for k in range(2)],
                    "tags": ["tree", "urban", "bench"],
                    "quality": {"score": 0.87, "flags": []},
                },
                subject=f"obs/obs-{i:06d}",
            )
            for i in range(n)
        ]
        payloads = [e.model_dump(mode="json", exclude_none=True) for e in events]
        return cls(events, payloads)

    @property
    def body_size(self) -> int:
        return len(self.events[0].to_json())


def _names(kind: str) -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]
    return f"bench.{run}.{kind}.events", f"bench.{run}.{kind}.q"


async def _pump(n: int, publish_one: Callable[[int], Awaitable[None]]) -> None:
    """Publish items ``0..n-1`` with at most ``WINDOW`` in flight."""
    items = iter(range(n))

    async def worker() -> None:
        for i in items:
            await publish_one(i)

    await asyncio.gather(*(worker() for _ in range(min(WINDOW, n))))


class Sample(NamedTuple):
    rate: float  # events/s, first publish to last event consumed
    cpu: float  # this process's CPU time per event, microseconds


async def _timed(n: int, publish_one: Callable[[int], Awaitable[None]], done: Any) -> Sample:
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.wait_for(asyncio.gather(_pump(n, publish_one), done), ROUND_TIMEOUT)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Sample(n / elapsed, cpu * 1e6 / n)


async def _cleanup(url: str, queues: list[str], exchanges: list[str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)


async def bare_round(url: str, work: Workload) -> Sample:
    """The baseline: plain aio-pika, a durable quorum queue bound to a durable topic
    exchange, confirms on, manual acks."""
    exchange_name, queue_name = _names("bare")
    connection = await aio_pika.connect(url)
    try:
        publisher = await connection.channel(publisher_confirms=True)
        exchange = await publisher.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=PREFETCH)
        queue = await consumer.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, routing_key=PATTERN)
        done = asyncio.get_running_loop().create_future()
        received = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal received
            json.loads(message.body)
            await message.ack()
            received += 1
            if received >= work.n and not done.done():
                done.set_result(None)

        await queue.consume(on_message, no_ack=False)

        async def publish_one(i: int) -> None:
            body = json.dumps(work.payloads[i], separators=(",", ":")).encode()
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, routing_key=ROUTING_KEY, mandatory=False, timeout=10)

        return await _timed(work.n, publish_one, done)
    finally:
        await connection.close()
        await _cleanup(url, [queue_name], [exchange_name])


async def bus_round(bus: EventBus, work: Workload, queue: str) -> Sample:
    """One of our adapters, through the port only."""
    done = asyncio.get_running_loop().create_future()
    received = 0

    async def handler(event: CloudEvent) -> None:
        nonlocal received
        received += 1
        if received >= work.n and not done.done():
            done.set_result(None)

    await bus.subscribe(queue, [PATTERN], handler)
    try:
        await bus.start()
        return await _timed(work.n, lambda i: bus.publish(work.events[i]), done)
    finally:
        await bus.close(timeout=10)


async def rabbitmq_round(url: str, work: Workload) -> Sample:
    exchange, queue = _names("rabbitmq")
    bus = RabbitMQBus(url, BusOptions(exchange=exchange, prefetch=PREFETCH), name="c4c-bench")
    try:
        return await bus_round(bus, work, queue)
    finally:
        await _cleanup(url, [queue, dead_letter_queue(queue)], [exchange, f"{exchange}.dlx"])


async def inprocess_round(_: str, work: Workload) -> Sample:
    _, queue = _names("inprocess")
    return await bus_round(InProcessBus(BusOptions(prefetch=PREFETCH)), work, queue)


VARIANTS: dict[str, Callable[[str, Workload], Awaitable[Sample]]] = {
    BARE: bare_round,
    RABBITMQ: rabbitmq_round,
    INPROCESS: inprocess_round,
}


async def check_broker(url: str) -> None:
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except (*CONNECTION_EXCEPTIONS, OSError, TimeoutError) as exc:
        raise ServiceUnavailable(f"RabbitMQ at {url} unreachable ({exc!r})") from exc
    await connection.close()


async def run(ctx: Context) -> list[Result]:
    await check_broker(ctx.broker_url)
    n, rounds = (QUICK_EVENTS, QUICK_ROUNDS) if ctx.quick else (EVENTS, ROUNDS)
    work = Workload.make(n)
    warmup = Workload.make(200)
    for variant in VARIANTS.values():  # imports, pydantic, broker-side caches
        await variant(ctx.broker_url, warmup)

    samples: dict[str, list[Sample]] = {name: [] for name in VARIANTS}
    for r in range(rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            sample = await VARIANTS[name](ctx.broker_url, work)
            samples[name].append(sample)
            log.info("round %d %s: %.0f events/s, %.0f µs CPU/event", r + 1, name, *sample)

    rates = {name: [s.rate for s in got] for name, got in samples.items()}
    cpus = {name: [s.cpu for s in got] for name, got in samples.items()}
    shape = f"median of {rounds} round(s) x {n} events of {work.body_size} B"

    def detail(per_round: dict[str, list[float]], name: str) -> str:
        text = f"{shape}; rounds: " + ", ".join(f"{x:,.0f}" for x in per_round[name])
        if name != BARE:
            pairs = zip(per_round[name], per_round[BARE], strict=True)
            ratios = [x / b for x, b in pairs]
            text += "; per-round ratios: " + ", ".join(f"{r:.2f}" for r in ratios)
            text += f" (median {median(ratios):.2f})"
        return text

    bare_rate, bare_cpu = median(rates[BARE]), median(cpus[BARE])
    cpu_unit, cpu_note = "µs CPU/event", "; this process only, lower is better (informational)"
    return [
        Result(SUITE, f"{BARE} events/s", bare_rate, "events/s", detail=detail(rates, BARE)),
        Result.against(
            SUITE,
            f"{RABBITMQ} events/s",
            median(rates[RABBITMQ]),
            "events/s",
            baseline=bare_rate,
            baseline_name=BARE,
            min_ratio=TARGET_RATIO,
            detail=detail(rates, RABBITMQ),
        ),
        Result.against(
            SUITE,
            f"{INPROCESS} events/s",
            median(rates[INPROCESS]),
            "events/s",
            baseline=bare_rate,
            baseline_name=BARE,
            detail=detail(rates, INPROCESS) + "; informational: no broker, no network",
        ),
        Result(
            SUITE,
            f"{BARE} client CPU",
            bare_cpu,
            cpu_unit,
            detail=detail(cpus, BARE) + cpu_note,
        ),
        Result.against(
            SUITE,
            f"{RABBITMQ} client CPU",
            median(cpus[RABBITMQ]),
            cpu_unit,
            baseline=bare_cpu,
            baseline_name=BARE,
            detail=detail(cpus, RABBITMQ) + cpu_note,
        ),
        Result.against(
            SUITE,
            f"{INPROCESS} client CPU",
            median(cpus[INPROCESS]),
            cpu_unit,
            baseline=bare_cpu,
            baseline_name=BARE,
            detail=detail(cpus, INPROCESS) + cpu_note,
        ),
    ]
