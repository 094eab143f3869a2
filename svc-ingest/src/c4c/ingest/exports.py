"""Export formats, written as streams from batches of published observations (as
:func:`c4c.ingest.service.represent` makes them): CSV, GeoJSON (RFC 7946) and a Darwin Core
Archive (a zip of ``meta.xml``, ``eml.xml``, the occurrence core and the Simple Multimedia
and MeasurementOrFact extensions). Memory stays flat: each batch is written and handed on
before the next is read; the archive's extensions are spooled to temporary files (to disk
past 1 MiB) while the core is written, then appended."""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import IO, Any
from xml.sax.saxutils import escape, quoteattr

from c4c.ingest.schemas import Licence

Batches = AsyncIterator[list[dict[str, Any]]]
DWC = "http://rs.tdwg.org/dwc/terms/"
DC = "http://purl.org/dc/terms/"
MULTIMEDIA_ROW = "http://rs.gbif.org/terms/1.0/Multimedia"
MOF_ROW = "http://rs.tdwg.org/dwc/terms/MeasurementOrFact"

# Occurrence core: (column, term URI, value from a published observation).
Getter = Callable[[dict[str, Any]], Any]


def _field(name: str) -> Getter:
    return lambda o: o.get(name)


CORE: list[tuple[str, str, Getter]] = [
    (name, DWC + name, _field(name))
    for name in (
        "occurrenceID",
        "basisOfRecord",
        "datasetID",
        "recordedBy",
        "eventDate",
        "decimalLatitude",
        "decimalLongitude",
        "coordinateUncertaintyInMeters",
        "geodeticDatum",
        "countryCode",
        "scientificName",
        "taxonRank",
        "vernacularName",
        "individualCount",
        "occurrenceStatus",
        "degreeOfEstablishment",
        "occurrenceRemarks",
        "dataGeneralizations",
    )
]
CORE += [
    ("license", DC + "license", lambda o: Licence(o["license"]).uri),
    ("modified", DC + "modified", lambda o: o.get("updatedAt")),
]
CSV_EXTRA: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("qualityGrade", lambda o: o["quality"]["grade"]),
    ("qualityScore", lambda o: o["quality"]["score"]),
    ("mediaCount", lambda o: len(o["media"])),
    ("createdAt", lambda o: o.get("createdAt")),
]
MEDIA_TYPES = {"image": "StillImage", "video": "MovingImage", "audio": "Sound"}
MULTIMEDIA = [
    ("type", DC + "type"),
    ("format", DC + "format"),
    ("identifier", DC + "identifier"),
    ("created", DC + "created"),
    ("creator", DC + "creator"),
    ("license", DC + "license"),
]
MEASUREMENTS = [
    (name, DWC + name)
    for name in (
        "measurementType",
        "measurementValue",
        "measurementUnit",
        "measurementMethod",
        "measurementRemarks",
    )
]


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Lines:
    """A csv writer whose output is drained after each batch."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer, lineterminator="\n")

    def row(self, values: list[Any]) -> None:
        self.writer.writerow([cell(v) for v in values])

    def drain(self) -> bytes:
        data = self.buffer.getvalue().encode()
        self.buffer.seek(0)
        self.buffer.truncate()
        return data


async def csv_stream(batches: Batches) -> AsyncIterator[bytes]:
    lines = _Lines()
    lines.row(["id"] + [name for name, _, _ in CORE] + [name for name, _ in CSV_EXTRA])
    yield lines.drain()
    async for batch in batches:
        for o in batch:
            lines.row([o["id"]] + [get(o) for _, _, get in CORE] + [get(o) for _, get in CSV_EXTRA])
        yield lines.drain()


def feature(o: dict[str, Any]) -> dict[str, Any]:
    properties = {k: v for k, v in o.items() if k not in ("decimalLatitude", "decimalLongitude")}
    unlocated = o["decimalLatitude"] is None  # RFC 7946 §3.2: a feature without a position
    return {
        "type": "Feature",
        "id": o["id"],
        "geometry": None
        if unlocated
        else {"type": "Point", "coordinates": [o["decimalLongitude"], o["decimalLatitude"]]},
        "properties": properties,
    }


async def geojson_stream(batches: Batches) -> AsyncIterator[bytes]:
    yield b'{"type":"FeatureCollection","features":['
    first = True
    async for batch in batches:
        parts = []
        for o in batch:
            parts.append(("" if first else ",") + json.dumps(feature(o), separators=(",", ":")))
            first = False
        yield "".join(parts).encode()
    yield b"]}"


class _Drain(io.RawIOBase):
    """A write-only, unseekable file: zipfile then streams with data descriptors."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


def _meta_xml() -> str:
    def fields(columns: list[tuple[str, str]], start: int) -> str:
        return "".join(
            f'    <field index="{i}" term={quoteattr(term)}/>\n'
            for i, (_, term) in enumerate(columns, start)
        )

    common = (
        'encoding="UTF-8" fieldsTerminatedBy="," linesTerminatedBy="\\n" '
        'fieldsEnclosedBy=\'"\' ignoreHeaderLines="1"'
    )
    core_columns = [(name, term) for name, term, _ in CORE]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="eml.xml">\n'
        f'  <core {common} rowType="{DWC}Occurrence">\n'
        "    <files><location>occurrence.csv</location></files>\n"
        '    <id index="0"/>\n'
        f"{fields(core_columns, 1)}"
        "  </core>\n"
        f'  <extension {common} rowType="{MULTIMEDIA_ROW}">\n'
        "    <files><location>multimedia.csv</location></files>\n"
        '    <coreid index="0"/>\n'
        f"{fields(MULTIMEDIA, 1)}"
        "  </extension>\n"
        f'  <extension {common} rowType="{MOF_ROW}">\n'
        "    <files><location>measurementorfact.csv</location></files>\n"
        '    <coreid index="0"/>\n'
        f"{fields(MEASUREMENTS, 1)}"
        "  </extension>\n"
        "</archive>\n"
    )


def _eml_xml(title: str, when: datetime) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<eml:eml xmlns:eml="eml://ecoinformatics.org/eml-2.1.1" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="eml://ecoinformatics.org/eml-2.1.1 '
        'http://rs.gbif.org/schema/eml-gbif-profile/1.1/eml.xsd" '
        f'packageId="c4c-export-{when:%Y%m%dT%H%M%SZ}" system="c4c" scope="system">\n'
        "  <dataset>\n"
        f"    <title>{escape(title)}</title>\n"
        "    <creator><organizationName>Cos4Cloud observation ingestion</organizationName>"
        "</creator>\n"
        f"    <pubDate>{when:%Y-%m-%d}</pubDate>\n"
        "    <language>en</language>\n"
        "    <abstract><para>Citizen observations exported with their media and "
        "measurements. Each record carries its own licence.</para></abstract>\n"
        "    <contact><organizationName>Cos4Cloud observation ingestion</organizationName>"
        "</contact>\n"
        "  </dataset>\n"
        "</eml:eml>\n"
    )


def _spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=1 << 20)


async def dwca_stream(batches: Batches, title: str) -> AsyncIterator[bytes]:
    sink = _Drain()
    media_spool, mof_spool = _spool(), _spool()
    media_lines, mof_lines = _Lines(), _Lines()
    media_lines.row(["coreid"] + [name for name, _ in MULTIMEDIA])
    mof_lines.row(["coreid"] + [name for name, _ in MEASUREMENTS])
    try:
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("meta.xml", _meta_xml())
            archive.writestr("eml.xml", _eml_xml(title, datetime.now(UTC)))
            yield sink.take()
            core = _Lines()
            core.row(["id"] + [name for name, _, _ in CORE])
            with archive.open("occurrence.csv", "w") as entry:
                entry.write(core.drain())
                async for batch in batches:
                    for o in batch:
                        core.row([o["id"]] + [get(o) for _, _, get in CORE])
                        for m in o["media"]:
                            if m["url"]:
                                media_lines.row(_media_row(o, m))
                        for fact in o["measurements"]:
                            mof_lines.row([o["id"]] + [fact.get(name) for name, _ in MEASUREMENTS])
                    entry.write(core.drain())
                    media_spool.write(media_lines.drain())
                    mof_spool.write(mof_lines.drain())
                    yield sink.take()
            for name, spool in (
                ("multimedia.csv", media_spool),
                ("measurementorfact.csv", mof_spool),
            ):
                spool.seek(0)
                with archive.open(name, "w") as entry:
                    while chunk := spool.read(1 << 16):
                        entry.write(chunk)
                        yield sink.take()
        yield sink.take()
    finally:
        media_spool.close()
        mof_spool.close()


def _media_row(o: dict[str, Any], m: dict[str, Any]) -> list[Any]:
    return [
        o["id"],
        MEDIA_TYPES.get(m["type"], m["type"]),
        m["format"],
        m["url"],
        m["created"],
        o["recordedBy"],
        Licence(o["license"]).uri,
    ]
