"""Observation ingestion:
citizen observations with media: idempotent, queryable, exportable, never lost.
"""
