"""The event bus: one port (:class:`EventBus`), two adapters with the same contract."""

from c4c.shared.bus._events import CLOUDEVENTS_MEDIA_TYPE, CloudEvent, event_source, new_event
from c4c.shared.bus._inprocess import InProcessBus
from c4c.shared.bus._port import BusOptions, DeadLetter, EventBus, Handler, PublishError
from c4c.shared.bus._rabbitmq import RabbitMQBus
from c4c.shared.bus._topic import topic_matches
from c4c.shared.settings import ServiceSettings

__all__ = [
    "CLOUDEVENTS_MEDIA_TYPE",
    "BusOptions",
    "CloudEvent",
    "DeadLetter",
    "EventBus",
    "Handler",
    "InProcessBus",
    "PublishError",
    "RabbitMQBus",
    "bus_from_settings",
    "bus_options",
    "event_source",
    "new_event",
    "topic_matches",
]


def bus_options(settings: ServiceSettings) -> BusOptions:
    return BusOptions(
        exchange=settings.bus_exchange,
        prefetch=settings.bus_prefetch,
        delivery_limit=settings.bus_delivery_limit,
        publish_timeout=settings.bus_publish_timeout,
        retry_backoff=settings.bus_retry_backoff,
    )


def bus_from_settings(settings: ServiceSettings) -> EventBus:
    """RabbitMQ when ``broker_url`` is set, otherwise the in-process bus."""
    if settings.broker_url:
        return RabbitMQBus(
            settings.broker_url, bus_options(settings), name=f"c4c-{settings.service_name}"
        )
    return InProcessBus(bus_options(settings), dead_letter_dir=settings.data_dir / "dead-letters")
