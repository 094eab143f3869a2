"""App configurations: per app, one document per configuration version, so an app built
against version 1 keeps getting version 1 while newer apps ask for 2. Each names the projects
(campaigns) the app serves, their forms, the licences offered, the sensor datastreams and
the species list for offline autocomplete. From the ``apps_file`` setting, else the demo
below."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c4c.shared.problems import NotFound

LICENCES = ["CC0", "CC-BY", "CC-BY-SA", "CC-BY-NC"]
_BIODIVERSITY_FORM = {
    "id": "plant-v1",
    "fields": [
        {"name": "scientificName", "type": "taxon", "required": False},
        {"name": "individualCount", "type": "integer", "required": False, "min": 1, "max": 10000},
        {
            "name": "degreeOfEstablishment",
            "type": "choice",
            "required": False,
            "choices": ["native", "cultivated", "captive"],
        },
        {"name": "photos", "type": "media", "required": True, "min": 1, "max": 5},
    ],
}
_ODOUR_FORM = {
    "id": "odour-v1",
    "fields": [
        {
            "name": "odour intensity",
            "type": "integer",
            "unit": "level",
            "required": True,
            "min": 0,
            "max": 6,
        },
        {
            "name": "odour type",
            "type": "choice",
            "required": False,
            "choices": ["waste", "sewage", "industry", "agriculture", "other"],
        },
    ],
}
DEMO: dict[str, dict[str, Any]] = {
    "natusfera": {
        "1": {
            "projects": [
                {
                    "id": "natusfera",
                    "name": "Natusfera: plants around you",
                    "forms": [_BIODIVERSITY_FORM],
                    "licences": LICENCES,
                    "datastreams": [],
                    "species": ["Bellis perennis", "Quercus ilex", "Taraxacum officinale"],
                }
            ]
        },
        "2": {
            "projects": [
                {
                    "id": "natusfera",
                    "name": "Natusfera: plants around you",
                    "forms": [_BIODIVERSITY_FORM],
                    "licences": LICENCES,
                    "datastreams": [
                        {"observedProperty": "air temperature", "unit": "Cel"},
                    ],
                    "species": ["Bellis perennis", "Quercus ilex", "Taraxacum officinale"],
                },
                {
                    "id": "odourcollect",
                    "name": "OdourCollect",
                    "forms": [_ODOUR_FORM],
                    "licences": ["CC-BY"],
                    "datastreams": [
                        {"observedProperty": "odour intensity", "unit": "level"},
                        {"observedProperty": "water transparency", "unit": "cm"},
                        {"observedProperty": "PM2.5", "unit": "ug/m3"},
                    ],
                    "species": [],
                },
            ]
        },
    }
}


class AppNotFound(NotFound):
    code, title = "app-not-found", "No such app or configuration version"


@dataclass(frozen=True)
class AppConfig:
    body: dict[str, Any]
    etag: str


class AppCatalogue:
    def __init__(self, apps: dict[str, dict[str, Any]]) -> None:
        self._apps = apps

    @classmethod
    def load(cls, path: Path | None) -> AppCatalogue:
        return cls(json.loads(path.read_text()) if path is not None else DEMO)

    def config(self, app: str, version: str | None) -> AppConfig:
        versions = self._apps.get(app)
        if not versions:
            raise AppNotFound(f"No app {app!r}.")
        chosen = version or max(versions, key=lambda v: (len(v), v))
        document = versions.get(chosen)
        if document is None:
            raise AppNotFound(
                f"App {app!r} has configuration versions {', '.join(sorted(versions))}.",
                versions=sorted(versions),
            )
        body = {"app": app, "version": chosen, "versions": sorted(versions), **document}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return AppConfig(body, f'"{hashlib.sha256(canonical).hexdigest()[:32]}"')
