"""API gateway: the suite's single front door."""
