"""A project's gallery: reference embeddings by species, and what identification learns from
them when they change.

- Scores: a ridge-regression classifier over the embeddings (one-hot targets, closed form).
  On the development photos it beats class prototypes and nearest neighbours clearly
  (leave-one-out top-1 ~0.95 against ~0.88), because it learns which dimensions separate
  *these* species.
- Probabilities: a softmax over the scores with a temperature fitted to the gallery's own
  leave-one-out scores (exact for ridge regression, without refitting).
- Open-set rejection: a query whose nearest reference is less similar (cosine) than the
  ``reject_quantile`` of the gallery's own leave-one-out nearest-neighbour similarities is
  "nothing close enough". So the threshold comes from known-species photos only — by
  construction about ``reject_quantile`` of them would be rejected — never from examples
  of what should be rejected.
- Several photos of one plant: scores averaged with organ weights; the best similarity over
  the photos decides rejection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ORGAN_WEIGHTS = {
    "flower": 1.0,
    "fruit": 0.8,
    "leaf": 0.8,
    "bark": 0.6,
    "habit": 0.5,
    "other": 0.4,
    "auto": 1.0,
}
MIN_REFERENCES_FOR_QUANTILE = 10
_TEMPERATURES = np.geomspace(0.005, 2.0, 60)
_CHUNK = 1024


@dataclass(frozen=True)
class Candidate:
    species: str
    score: float
    nearest: tuple[int, ...]
    """Indices of this species' references closest to the query, best first (as many as
    ``Gallery.identify`` was asked for)."""


@dataclass(frozen=True)
class Identification:
    candidates: list[Candidate]
    best_similarity: float
    threshold: float
    rejected: bool
    predicted_organs: list[tuple[str, float]] = field(default_factory=list)
    """Per photo, when one's organ is 'auto': the organ most of its nearest references show,
    and that share."""


@dataclass
class Gallery:
    version: str
    species: list[str]
    embeddings: np.ndarray
    labels: np.ndarray
    organs: list[str]
    reference_ids: list[str]
    weights: np.ndarray
    temperature: float
    threshold: float
    _members: list[np.ndarray] = field(init=False, repr=False)
    """Per species, the indices of its references."""

    def __post_init__(self) -> None:
        self._members = [np.flatnonzero(self.labels == i) for i in range(len(self.species))]

    @classmethod
    def fit(
        cls,
        version: str,
        embeddings: np.ndarray,
        species_of: Sequence[str],
        organs: Sequence[str],
        reference_ids: Sequence[str],
        *,
        ridge: float = 0.1,
        reject_quantile: float = 0.02,
        reject_similarity: float | None = None,
        default_similarity: float = 0.5,
    ) -> Gallery:
        species = sorted(set(species_of))
        index = {name: i for i, name in enumerate(species)}
        labels = np.array([index[name] for name in species_of], dtype=np.int64)
        x = np.asarray(embeddings, dtype=np.float64)
        weights, loo = _ridge(x, labels, len(species), ridge)
        temperature = _fit_temperature(loo, labels) if len(species) > 1 else 1.0
        if reject_similarity is not None:
            threshold = reject_similarity
        elif len(x) >= MIN_REFERENCES_FOR_QUANTILE:
            threshold = float(np.quantile(_loo_nearest(x), reject_quantile))
        else:
            threshold = default_similarity
        return cls(
            version=version,
            species=species,
            embeddings=np.asarray(embeddings, dtype=np.float32),
            labels=labels,
            organs=list(organs),
            reference_ids=list(reference_ids),
            weights=weights.astype(np.float32),
            temperature=temperature,
            threshold=threshold,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return np.asarray(_with_bias(queries) @ self.weights)

    def identify(
        self,
        queries: np.ndarray,
        organs: Sequence[str],
        *,
        nearest: int = 3,
        limit: int | None = None,
    ) -> Identification:
        """The species ranked by probability (the ``limit`` most probable, else all), each
        with its ``nearest`` closest references (none with 0)."""
        weights = np.array([ORGAN_WEIGHTS.get(organ, 1.0) for organ in organs])
        fused = (weights[:, None] * self.scores(queries)).sum(axis=0) / weights.sum()
        probabilities = _softmax(fused / self.temperature)
        similarities = queries @ self.embeddings.T  # (photos, references)
        best_similarity = float(similarities.max())
        closest = similarities.max(axis=0) if nearest else None
        scores = probabilities.tolist()
        candidates = []
        for i in np.argsort(-probabilities)[:limit].tolist():
            order: tuple[int, ...] = ()
            if closest is not None:
                # Only the candidate's own references are sorted: a flora's whole gallery,
                # per query, would cost in proportion to its size.
                own = self._members[i]
                order = tuple(own[np.argsort(-closest[own], kind="stable")[:nearest]].tolist())
            candidates.append(Candidate(self.species[i], scores[i], order))
        return Identification(
            candidates=candidates,
            best_similarity=best_similarity,
            threshold=self.threshold,
            rejected=best_similarity < self.threshold,
            predicted_organs=[self._organ_of(row) for row in similarities]
            if "auto" in organs
            else [],
        )

    def _organ_of(self, similarities: np.ndarray, k: int = 5) -> tuple[str, float]:
        k = min(k, len(similarities))
        closest = np.argpartition(-similarities, k - 1)[:k]
        neighbours = closest[np.argsort(-similarities[closest])].tolist()  # ties: nearest first
        organ, votes = Counter(self.organs[j] for j in neighbours).most_common(1)[0]
        return organ, votes / len(neighbours)


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1), dtype=x.dtype)])


def _ridge(
    x: np.ndarray, labels: np.ndarray, classes: int, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the ridge classifier and its exact leave-one-out scores (PRESS: the
    prediction for each reference from a fit without it, from the hat matrix' diagonal)."""
    xa = _with_bias(x)
    targets = np.eye(classes)[labels]
    n, d = xa.shape
    if n <= d:  # dual form: an n x n system
        gram = xa @ xa.T
        alpha = np.linalg.solve(gram + ridge * np.eye(n), targets)
        weights = xa.T @ alpha
        hat = gram @ np.linalg.solve(gram + ridge * np.eye(n), np.eye(n))
        leverage = np.diag(hat)
    else:  # primal form: a d x d system
        inverse = np.linalg.inv(xa.T @ xa + ridge * np.eye(d))
        weights = inverse @ xa.T @ targets
        leverage = np.einsum("ij,jk,ik->i", xa, inverse, xa)
    fitted = xa @ weights
    loo = (fitted - leverage[:, None] * targets) / np.maximum(1 - leverage, 1e-9)[:, None]
    return weights, loo


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def _fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the log-loss of the leave-one-out scores."""
    rows = np.arange(len(labels))
    losses = [
        -np.log(np.maximum(_softmax(scores / t)[rows, labels], 1e-12)).mean() for t in _TEMPERATURES
    ]
    return float(_TEMPERATURES[int(np.argmin(losses))])


def _loo_nearest(x: np.ndarray) -> np.ndarray:
    """Each reference's cosine similarity to its nearest other reference."""
    out = np.empty(len(x))
    for start in range(0, len(x), _CHUNK):
        block = x[start : start + _CHUNK] @ x.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
        out[start : start + _CHUNK] = block.max(axis=1)
    return out
