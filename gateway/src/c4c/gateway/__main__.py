"""``python -m c4c.gateway``: the gateway; with no upstreams configured, the whole suite in
this one process (embedded mode)."""

from c4c.gateway.app import create_app
from c4c.gateway.settings import GatewaySettings
from c4c.shared.app import serve

settings = GatewaySettings()
serve(create_app(settings), settings)
