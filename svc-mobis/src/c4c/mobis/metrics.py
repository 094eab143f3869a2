"""MOBIS' own metrics (names are a contract with deploy/ dashboards and alerts)."""

from prometheus_client import Counter, Gauge

SYNC_ITEMS = Counter(
    "c4c_mobis_sync_items",
    "Observations synced by apps, by outcome: created, duplicate, updated, conflict, error.",
    ["outcome"],
)
RESERVATIONS_SETTLED = Counter(
    "c4c_mobis_reservations_settled",
    "Reservations of syncs that never finished, settled in the background, by outcome: "
    "confirmed (ingest has the observation), dropped (it does not).",
    ["outcome"],
)
LOGINS = Counter(
    "c4c_mobis_logins", "Login attempts, by outcome: success, failure, throttled.", ["outcome"]
)
SSE_CLIENTS = Gauge("c4c_mobis_sse_clients", "Apps connected to the live event stream now.")
