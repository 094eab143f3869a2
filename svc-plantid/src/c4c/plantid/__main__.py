"""``python -m c4c.plantid``: the plantid service alone, configured from the environment."""

from c4c.plantid.app import create_app
from c4c.plantid.settings import PlantidSettings
from c4c.shared.app import serve

settings = PlantidSettings()
serve(create_app(settings), settings)
