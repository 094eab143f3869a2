"""``python -m bench [suite ...] [--quick] [--out DIR]``: run the suites, write the report.

Exit status: 0 when every selected suite ran or was skipped for want of a service; 1 when a
suite crashed, or a service was absent under ``C4C_REQUIRE_SERVICES=1``. Unmet targets are
shown in the table (✗), not in the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import bench
from bench._core import Context, Result, ServiceUnavailable, cpu_check, services_required
from bench._report import table, write

PREFIX = "suite_"
HERE = Path(__file__).resolve().parent


def available_suites() -> list[str]:
    """Every ``bench/suite_*.py``, by the name after the prefix."""
    return sorted(
        info.name.removeprefix(PREFIX)
        for info in pkgutil.iter_modules(bench.__path__)
        if info.name.startswith(PREFIX)
    )


def load(name: str) -> ModuleType:
    return importlib.import_module(f"bench.{PREFIX}{name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    suites = available_suites()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "suites", nargs="*", metavar="suite", help=f"suites to run (default: all of {suites})"
    )
    parser.add_argument("--quick", action="store_true", help="a small workload (for tests)")
    parser.add_argument(
        "--out", type=Path, default=HERE, help="where to write results.json/.md (default: bench/)"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.suites) - set(suites))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; available: {suites}")
    args.suites = args.suites or suites
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="   %(name)s: %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)  # progress of long suites
    ctx = Context(quick=args.quick)
    results: list[Result] = []
    notes: list[str] = []
    failed = False
    for name in args.suites:
        print(f"== {name}", file=sys.stderr, flush=True)
        started, speed = time.perf_counter(), cpu_check()
        try:
            rows = asyncio.run(load(name).run(ctx))
        except ServiceUnavailable as exc:
            if services_required():
                failed = True
                notes.append(f"{name}: FAILED, required service unavailable: {exc}")
            else:
                notes.append(
                    f"{name}: skipped, {exc} (set C4C_REQUIRE_SERVICES=1 to make this a failure)"
                )
            print(f"   {notes[-1]}", file=sys.stderr, flush=True)
            continue
        except Exception:
            failed = True
            traceback.print_exc()
            notes.append(f"{name}: CRASHED (traceback on stderr)")
            continue
        results.extend(rows)
        notes.append(
            f"{name}: CPU check {speed:.1f} µs before, {cpu_check():.1f} after (a fixed "
            "pure-Python loop, lower is faster: the machine's speed, for absolute figures)"
        )
        print(f"   done in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    write(args.out, results, notes, quick=args.quick)
    print(table(results))
    for note in notes:
        print(f"- {note}")
    print(f"\nwritten to {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
