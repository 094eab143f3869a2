"""``python -m c4c.ingest``: the ingest service alone, configured from the environment."""

from c4c.ingest.app import create_app
from c4c.ingest.settings import IngestSettings
from c4c.shared.app import serve

settings = IngestSettings()
serve(create_app(settings), settings)
