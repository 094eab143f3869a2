"""``python -m c4c.gateway``: the gateway (with no upstreams configured, the whole suite in
this one process: embedded mode); ``python -m c4c.gateway keys ...`` manages API keys."""

import sys

from c4c.gateway._cli import main

sys.exit(main())
