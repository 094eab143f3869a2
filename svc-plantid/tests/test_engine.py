"""The engine: the PyTorch weights read without PyTorch (safely), the ONNX graph built from
them (checked against ImageNet classes on real photos), and the gallery's statistics."""

from __future__ import annotations

import dataclasses
import pickle
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from c4c.plantid.engine import efficientnet
from c4c.plantid.engine.embedder import Embedder, ModelSpec, default_model
from c4c.plantid.engine.gallery import Gallery, _ridge
from c4c.plantid.engine.torch_weights import WeightsError, load_state_dict
from c4c.plantid.images import decode_photo

DAISY = 985  # ImageNet class "daisy"


def _legacy_file(path: Path, payload: object) -> Path:
    """A file in PyTorch's legacy layout around ``payload``."""
    with path.open("wb") as file:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(part, file, protocol=2)
        file.write(payload if isinstance(payload, bytes) else pickle.dumps(payload, protocol=2))
        pickle.dump([], file, protocol=2)
    return path


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_weights_reader_refuses_code_in_the_pickle(tmp_path: Path) -> None:
    path = _legacy_file(tmp_path / "evil.pth", pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(WeightsError, match="refusing to load"):
        load_state_dict(path)


def test_weights_reader_refuses_a_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(struct.pack("<q", 7) + b"not a pickle at all")
    with pytest.raises(WeightsError):
        load_state_dict(path)


def test_default_weights_read_into_every_lite0_tensor() -> None:
    weights = load_state_dict(efficientnet.default_weights_file())
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert not any(key.endswith("_se_reduce.weight") for key in weights)  # Lite: no SE
    assert all(np.isfinite(v).all() for v in weights.values())


def test_built_model_is_cached_and_reused(tmp_path: Path) -> None:
    first = default_model(tmp_path)
    stamp = first.path.stat().st_mtime_ns
    second = default_model(tmp_path)
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == stamp
    assert first.version.startswith("efficientnet-lite0-")


def test_graph_classifies_daisies_as_imagenet_daisy(model: ModelSpec, plants: Path) -> None:
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    embedder = Embedder(model)
    try:
        photos = sorted((plants / "Leucanthemum_vulgare").glob("*.jpg"))[:4]
        batch = np.stack(
            [embedder.tensor(decode_photo(p.read_bytes(), max_pixels=10**8)) for p in photos]
        )
        embedding, logits = session.run(["embedding", "logits"], {"image": batch})
    finally:
        embedder.close()
    assert (logits.argmax(axis=1) == DAISY).sum() >= 3
    assert embedding.shape == (4, efficientnet.EMBEDDING_DIM)
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-4)


def test_tensor_is_the_normalised_centre_square_channels_first(model: ModelSpec) -> None:
    # Uneven mean and std per channel: the fused scaling must keep each channel's own.
    spec = dataclasses.replace(model, mean=(120.0, 110.0, 100.0), std=(60.0, 55.0, 50.0))
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
    embedder = Embedder(spec)
    try:
        tensor = embedder.tensor(image)
        batch = np.zeros((2, 3, spec.input_size, spec.input_size), dtype=np.float32)
        embedder.tensor(image, out=batch[1])
    finally:
        embedder.close()
    square = np.asarray(
        image.resize(
            (spec.input_size, spec.input_size), Image.Resampling.BICUBIC, box=(50, 0, 350, 300)
        ),
        dtype=np.float32,
    )
    expected = ((square - spec.mean) / np.array(spec.std)).transpose(2, 0, 1)
    assert tensor.shape == (3, spec.input_size, spec.input_size)
    assert tensor.dtype == np.float32
    assert np.allclose(tensor, expected, atol=1e-5)
    assert np.array_equal(batch[1], tensor)
    assert not batch[0].any()  # only the row asked for is written


def _clusters(
    rng: np.random.Generator, classes: int, per_class: int, dim: int = 32
) -> tuple[np.ndarray, list[str]]:
    centres = rng.normal(size=(classes, dim))
    x = np.repeat(centres, per_class, axis=0) + 0.3 * rng.normal(size=(classes * per_class, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [f"Species {i}" for i in range(classes) for _ in range(per_class)]


@pytest.mark.parametrize("dim", [8, 64])  # primal (n > d) and dual (n <= d) forms
def test_ridge_leave_one_out_scores_equal_refitting_without_the_photo(dim: int) -> None:
    rng = np.random.default_rng(1)
    x, names = _clusters(rng, 4, 6, dim)
    labels = np.array([int(n.split()[1]) for n in names])
    _, loo = _ridge(x, labels, 4, 0.1)
    for i in (0, 7, 23):
        keep = np.arange(len(x)) != i
        weights, _ = _ridge(x[keep], labels[keep], 4, 0.1)
        refit = np.append(x[i], 1.0) @ weights
        assert np.allclose(loo[i], refit, atol=1e-8)


def test_gallery_identifies_ranks_and_rejects_far_queries() -> None:
    rng = np.random.default_rng(2)
    x, names = _clusters(rng, 5, 8)
    gallery = Gallery.fit("v1", x[1:], names[1:], ["flower"] * 39, [str(i) for i in range(39)])
    found = gallery.identify(x[:1], ["flower"])
    scores = [c.score for c in found.candidates]
    assert found.candidates[0].species == names[0]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 1 for s in scores)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    assert not found.rejected
    assert found.predicted_organs == []  # asked for 'auto' photos only
    assert gallery.identify(x[:1], ["auto"]).predicted_organs == [("flower", 1.0)]
    far = -x[:1]  # pointing away from every reference
    assert gallery.identify(far, ["auto"]).rejected
    # The threshold is the quantile of the gallery's own nearest-neighbour similarities.
    assert 0 < gallery.threshold < 1


def test_gallery_fuses_photos_with_organ_weights() -> None:
    rng = np.random.default_rng(3)
    x, names = _clusters(rng, 3, 6)
    gallery = Gallery.fit("v1", x, names, ["flower"] * 18, [str(i) for i in range(18)])
    a, b = x[0:1], x[6:7]  # species 0 and species 1
    both = gallery.identify(np.vstack([a, b]), ["flower", "bark"])  # flower weighs more
    assert both.candidates[0].species == names[0]
    swapped = gallery.identify(np.vstack([a, b]), ["bark", "flower"])
    assert swapped.candidates[0].species == names[6]


def test_gallery_names_each_candidates_closest_references_best_first() -> None:
    rng = np.random.default_rng(5)
    x, names = _clusters(rng, 4, 5)
    # Species interleaved, and one with fewer references (2) than candidates name (3).
    order = rng.permutation(np.arange(3, len(x)))
    x, names = x[order], [names[i] for i in order]
    gallery = Gallery.fit("v1", x, names, ["flower"] * len(x), [str(i) for i in range(len(x))])
    query = x[:2] + 0.05
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    found = gallery.identify(query, ["flower", "leaf"])
    closest = (query @ x.T).max(axis=0)
    assert {c.species for c in found.candidates} == set(names)
    for candidate in found.candidates:
        own = [i for i, name in enumerate(names) if name == candidate.species]
        best_first = sorted(own, key=lambda i: -closest[i])
        assert list(candidate.nearest) == best_first[:3]


def test_gallery_names_no_references_when_asked_for_none() -> None:
    rng = np.random.default_rng(6)
    x, names = _clusters(rng, 4, 5)
    gallery = Gallery.fit("v1", x, names, ["flower"] * len(x), [str(i) for i in range(len(x))])
    with_nearest = gallery.identify(x[:1], ["flower"])
    without = gallery.identify(x[:1], ["flower"], nearest=0)
    assert [c.nearest for c in without.candidates] == [()] * len(without.candidates)
    assert [(c.species, c.score) for c in without.candidates] == [
        (c.species, c.score) for c in with_nearest.candidates
    ]
    assert (without.best_similarity, without.rejected) == (
        with_nearest.best_similarity,
        with_nearest.rejected,
    )
