"""``python -m c4c.quality``: the quality service alone, configured from the environment."""

from c4c.quality.app import create_app
from c4c.quality.settings import QualitySettings
from c4c.shared.app import serve

settings = QualitySettings()
serve(create_app(settings), settings)
