"""``docs/settings.md`` is generated from the settings classes, and this test keeps it true:
when a setting is added or changed, it fails until the page is rewritten with
``.venv/bin/python tests/test_settings_doc.py``."""

from __future__ import annotations

import importlib
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from c4c.shared.settings import ServiceSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"

HEADER = """# Settings

Generated from the settings classes by `tests/test_settings_doc.py` (which fails when this page
is out of date); the classes are the reference. Every setting is an environment variable (or
a line in `.env`). A service looks first in its own section, `C4C_<SERVICE>_<NAME>` (e.g.
`C4C_INGEST_DATABASE_URL`), then in the suite-wide `C4C_<NAME>`. Lists and maps are JSON.
"""


def _default(field: FieldInfo) -> str:
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    return str(value)


def _table(prefix: str, fields: dict[str, FieldInfo]) -> list[str]:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        default = _default(field).replace("|", "\\|")
        lines.append(f"| `{prefix}{name.upper()}` | `{default}` | {meaning} |")
    return lines


def settings_classes() -> list[type[ServiceSettings]]:
    """Each installed service's settings class, gateway first."""
    modules = ["c4c.gateway.settings"] + [
        f"c4c.{entry.name}.settings"
        for entry in sorted(entry_points(group="c4c.services"), key=lambda e: e.name)
    ]
    classes = []
    for module in modules:
        found = [
            value
            for value in vars(importlib.import_module(module)).values()
            if isinstance(value, type)
            and issubclass(value, ServiceSettings)
            and value is not ServiceSettings
            and value.__module__ == module
        ]
        assert len(found) == 1, f"{module} should define one settings class, found {found}"
        classes.append(found[0])
    return classes


def render() -> str:
    lines = [HEADER, "## Suite-wide", "", *_table("C4C_", ServiceSettings.model_fields)]
    for cls in settings_classes():
        own = {
            name: field
            for name, field in cls.model_fields.items()
            if name not in ServiceSettings.model_fields
        }
        lines += ["", f"## {cls.service_name}", ""]
        if own:
            lines += _table(f"C4C_{cls.service_name.upper()}_", own)
        else:
            lines.append("No settings of its own.")
        port = cls.model_fields["port"].get_default()
        lines += ["", f"Listens alone on port `{port}` (`C4C_{cls.service_name.upper()}_PORT`)."]
    return "\n".join(lines) + "\n"


def test_settings_page_is_current() -> None:
    expected = render()
    assert DOC.read_text() == expected, (
        "docs/settings.md is out of date: run .venv/bin/python tests/test_settings_doc.py"
    )


if __name__ == "__main__":
    DOC.write_text(render())
    sys.stdout.write(f"wrote {DOC}\n")
