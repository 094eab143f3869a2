"""The MOBIS domain: accounts (``accounts``) and observations, media and events
(``observations``). No HTTP, no SQL."""
