"""Offline geography from registry packages: the country of a point (the nearest of
GeoNames' places of 1,000+ people, from ``reverse_geocode``) and open sea (the 1 km GLOBE
land mask of ``global-land-mask``, reduced once to 0.1° cells that are sea all over, whose
neighbours are too: at least ~10 km from any coast).

Both load in seconds on first use: :meth:`OfflineGeography.load` in a worker thread."""

from __future__ import annotations

import functools
import importlib.util
import threading
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

CELL_FINE = 12  # the mask's 1/120° cells per 0.1° cell
COUNTRY_CACHE_SIZE = 200_000


class OfflineGeography:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open_sea: np.ndarray[Any, np.dtype[np.bool_]] | None = None
        self._geocoder: Any = None
        self._countries: dict[tuple[float, float], str | None] = {}

    def load(self) -> OfflineGeography:
        with self._lock:
            if self._geocoder is None:
                import reverse_geocode  # type: ignore[import-untyped]

                self._geocoder = reverse_geocode
                self._geocoder.get((0.0, 0.0))  # builds its KD-tree
            if self._open_sea is None:
                self._open_sea = _open_sea_cells()
        return self

    def country_at(self, latitude: float, longitude: float) -> str | None:
        point = (latitude, longitude)
        if point not in self._countries:
            self.prime([point])
        return self._countries[point]

    def prime(self, points: Iterable[tuple[float | None, float | None]]) -> None:
        """Look the countries of many points up at once, ahead of :meth:`country_at` (one
        vectorised tree query costs about what a single one does); points off the globe
        are left out."""
        if self._geocoder is None:
            self.load()
        todo = list(
            {
                (lat, lon)
                for lat, lon in points
                if lat is not None
                and lon is not None
                and abs(lat) <= 90
                and abs(lon) <= 180
                and (lat, lon) not in self._countries
            }
        )
        if not todo:
            return
        if len(self._countries) + len(todo) > COUNTRY_CACHE_SIZE:
            self._countries.clear()
        for point, place in zip(todo, self._geocoder.search(todo), strict=True):
            code = place.get("country_code")
            self._countries[point] = str(code).upper() if code else None

    def in_open_sea(self, latitude: float, longitude: float) -> bool:
        if self._open_sea is None:
            self.load()
        assert self._open_sea is not None
        rows, cols = self._open_sea.shape
        row = min(int((90.0 - latitude) * rows / 180.0), rows - 1)
        col = min(int((longitude + 180.0) * cols / 360.0), cols - 1)
        return bool(self._open_sea[row, col])


def _mask_file() -> Path:
    # Importing global_land_mask would inflate its whole 1 GB mask: read the file instead.
    spec = importlib.util.find_spec("global_land_mask")
    assert spec is not None
    assert spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "globe_combined_mask_compressed.npz"


def _open_sea_cells() -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Stream the 21600x43200 ocean mask (True = sea) row block by row block."""
    with zipfile.ZipFile(_mask_file()) as archive, archive.open("mask.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        (rows, cols), _, _ = read_header(stream)
        sea = np.zeros((rows // CELL_FINE, cols // CELL_FINE), dtype=bool)
        for i in range(sea.shape[0]):
            block = np.frombuffer(stream.read(CELL_FINE * cols), dtype=bool)
            sea[i] = block.reshape(CELL_FINE, cols // CELL_FINE, CELL_FINE).all(axis=(0, 2))
    open_sea = sea.copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            open_sea &= np.roll(np.roll(sea, dr, axis=0), dc, axis=1)
    return open_sea


@functools.lru_cache(maxsize=1)
def offline_geography() -> OfflineGeography:
    return OfflineGeography()
