"""Reads a PyTorch state dict (``.pth``) into numpy arrays without PyTorch.

Both default weight files use PyTorch's legacy serialisation (before 1.6): a stream of
pickles — magic number, protocol version, system info, the state dict whose tensors point
at storages by key, the list of storage keys — followed by each storage's raw bytes in that
order. The unpickler is restricted: it builds ordered dicts, tensors and storages and
refuses every other global, so a hostile file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
}


class WeightsError(ValueError):
    """The file is not a state dict this reader understands (or is not safe to read)."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_: Any,
) -> _TensorRef:
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise WeightsError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise WeightsError(f"unexpected persistent id {pid!r}")
        storage_type = pid[1]
        if not isinstance(storage_type, _StorageType):
            raise WeightsError("unknown storage type")
        return _StorageRef(str(pid[2]), storage_type.dtype)


def _load(stream: BinaryIO) -> Any:
    return _RestrictedUnpickler(stream).load()


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format ``.pth`` state dict, by name, as float32/int64 arrays."""
    data = path.read_bytes()
    stream = io.BytesIO(data)
    try:
        if _load(stream) != _LEGACY_MAGIC or _load(stream) != _LEGACY_PROTOCOL:
            raise WeightsError(f"{path.name} is not a legacy PyTorch file")
        _load(stream)  # system info: endianness, type sizes
        tree = _load(stream)
        keys = _load(stream)
    except (pickle.UnpicklingError, EOFError) as exc:
        raise WeightsError(f"{path.name}: {exc}") from exc
    storages: dict[str, np.ndarray] = {}
    dtypes = _storage_dtypes(tree)
    for key in keys:
        (count,) = struct.unpack("<q", stream.read(8))
        dtype = dtypes.get(key, np.dtype("<f4"))
        raw = stream.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise WeightsError(f"{path.name} is truncated")
        storages[key] = np.frombuffer(raw, dtype=dtype)
    if not isinstance(tree, dict):
        raise WeightsError(f"{path.name} does not hold a state dict")
    return {
        name: _materialise(ref, storages)
        for name, ref in tree.items()
        if isinstance(ref, _TensorRef)
    }


def _storage_dtypes(tree: Any) -> dict[str, np.dtype[Any]]:
    if not isinstance(tree, dict):
        return {}
    return {
        ref.storage.key: ref.storage.dtype for ref in tree.values() if isinstance(ref, _TensorRef)
    }


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    flat = storages[ref.storage.key]
    item = flat.itemsize
    if ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True)) >= len(
        flat
    ) and any(ref.shape):
        raise WeightsError("tensor exceeds its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * item for s in ref.stride),
    )
    return np.array(view, dtype=np.float32 if flat.dtype.kind == "f" else np.int64)
