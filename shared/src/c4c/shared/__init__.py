"""What every Cos4Cloud service is built on: settings, the app factory, the database, the
event bus, the outbox, idempotent consumers, problem documents and metrics."""
