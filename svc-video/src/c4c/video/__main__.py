"""``python -m c4c.video``: the video service alone, configured from the environment."""

from c4c.shared.app import serve
from c4c.video.app import create_app
from c4c.video.settings import VideoSettings

settings = VideoSettings()
serve(create_app(settings), settings)
