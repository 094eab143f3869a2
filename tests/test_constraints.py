"""``constraints.txt`` pins every release the suite installs (``make install`` and the
images take only those). A dependency added to a ``pyproject.toml`` or to
``requirements-dev.txt`` without ``make lock`` would install unpinned, at whatever release
is newest that day: this test names it. It follows the requirements from the suite's own
distributions, so whatever else a developer installed in the venv does not count."""

from __future__ import annotations

from importlib.metadata import distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[str]:
    stripped = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in stripped if line]


def pinned() -> dict[str, str]:
    pairs = (line.split("==", 1) for line in _lines(ROOT / "constraints.txt"))
    return {canonicalize_name(name): version for name, version in pairs}


def required() -> dict[str, str]:
    """Every distribution the suite's components and dev tools need, with its installed
    release: their requirements followed through, extras and markers as pip would."""
    own = [d for d in distributions() if d.metadata["Name"].startswith("c4c-")]
    todo = [Requirement(r) for d in own for r in d.requires or []]
    todo += [Requirement(line) for line in _lines(ROOT / "requirements-dev.txt")]
    extras_of: dict[str, set[str]] = {}
    while todo:
        requirement = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in extras_of and requirement.extras <= extras_of[name]:
            continue
        extras = extras_of[name] = extras_of.get(name, set()) | requirement.extras
        for line in distribution(name).requires or []:
            child = Requirement(line)
            wanted = child.marker is None or any(
                child.marker.evaluate({"extra": e}) for e in extras | {""}
            )
            if wanted:
                todo.append(Requirement(str(child).split(";", 1)[0]))
    return {n: distribution(n).version for n in extras_of if not n.startswith("c4c-")}


def test_every_release_the_suite_needs_is_the_one_pinned() -> None:
    pins, needed = pinned(), required()
    assert len(needed) > 50  # the walk found the suite's requirements
    unpinned = sorted(needed.keys() - pins.keys())
    assert not unpinned, f"needed but not in constraints.txt (run `make lock`): {unpinned}"
    other = {n: (v, pins[n]) for n, v in needed.items() if pins[n] != v}
    assert not other, f"installed releases differ from constraints.txt (installed, pinned): {other}"
