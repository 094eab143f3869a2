"""Benchmarks for the Cos4Cloud suite: ``python -m bench [suite ...] [--quick] [--out DIR]``.

Each ``bench/suite_*.py`` module is one suite. It exposes ``async def run(ctx: Context) ->
list[Result]`` and raises :class:`ServiceUnavailable` when a service it needs is absent.
Figures are compared with a baseline measured in the same run, so a shared, noisy machine
still gives a meaningful ratio.
"""

from bench._core import Context, Result, ServiceUnavailable

__all__ = ["Context", "Result", "ServiceUnavailable"]
