"""MOBIS' own metrics (names are a contract with deploy/ dashboards and alerts)."""

from prometheus_client import Counter, Gauge

SYNC_ITEMS = Counter(
    "c4c_mobis_sync_items",
    "Observations synced by apps, by outcome: created, duplicate, updated, conflict, error.",
    ["outcome"],
)
RESERVATIONS_DROPPED = Counter(
    "c4c_mobis_reservations_dropped",
    "Reservations of syncs that never finished whose observation ingest does not have, "
    "forgotten in the background after the grace period.",
)
LOGINS = Counter(
    "c4c_mobis_logins", "Login attempts, by outcome: success, failure, throttled.", ["outcome"]
)
SSE_CLIENTS = Gauge("c4c_mobis_sse_clients", "Apps connected to the live event stream now.")
