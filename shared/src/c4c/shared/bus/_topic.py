"""AMQP topic routing: ``*`` matches exactly one dot-separated word, ``#`` zero or more."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4096)
def topic_matches(pattern: str, routing_key: str) -> bool:
    words = routing_key.split(".")
    # Dynamic programming over (pattern position, word position): O(len(pattern) x len(key)),
    # where naive backtracking on several '#' is exponential.
    reachable = {0}
    for part in pattern.split("."):
        if part == "#":
            start = min(reachable, default=len(words) + 1)
            reachable = set(range(start, len(words) + 1))
        else:
            reachable = {i + 1 for i in reachable if i < len(words) and part in ("*", words[i])}
        if not reachable:
            return False
    return len(words) in reachable
