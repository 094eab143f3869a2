"""``python -m c4c.mobis``: the mobis service alone, configured from the environment."""

from c4c.mobis.app import create_app
from c4c.mobis.settings import MobisSettings
from c4c.shared.app import serve

settings = MobisSettings()
serve(create_app(settings), settings)
