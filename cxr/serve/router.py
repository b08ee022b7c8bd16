"""A/B traffic splitting: weighted, sticky by request key, changeable without a restart."""

from __future__ import annotations

import hashlib
import math
import random
import threading

from cxr.serve.errors import RequestError


class Router:
    """Chooses a variant per request: an explicit target wins, else a key hash (sticky), else chance."""

    def __init__(self, weights: dict[str, float]):
        self._lock = threading.Lock()
        self.set_weights(weights)

    @property
    def weights(self) -> dict[str, float]:
        """Current normalised weights."""
        with self._lock:
            return dict(self._weights)

    def set_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """Replace the weights (normalised to sum 1); variants are fixed at start-up."""
        if not weights or not all(_valid_weight(w) for w in weights.values()):
            raise RequestError(
                f"weights must map each variant to a finite, non-negative number, got {weights!r}"[:300]
            )
        total = float(sum(weights.values()))
        if total <= 0:
            raise RequestError("at least one weight must be positive")
        known = getattr(self, "_weights", None)
        if known is not None and set(weights) != set(known):
            raise RequestError(f"weights must name exactly the served variants: {sorted(known)}")
        with self._lock:
            self._weights = {name: float(w) / total for name, w in sorted(weights.items())}
        return self.weights

    def choose(self, key: str | None = None, target: str | None = None) -> str:
        """The variant for one request."""
        weights = self.weights
        if target:
            if target not in weights:
                raise RequestError(f"unknown target variant {target!r}; served: {sorted(weights)}")
            return target
        point = _unit_hash(key) if key else random.random()  # noqa: S311  # nosec B311
        cumulative = 0.0
        for name, weight in weights.items():
            cumulative += weight
            if point < cumulative:
                return name
        return next(reversed(weights))


def _valid_weight(weight: object) -> bool:
    """A finite, non-negative number (booleans, NaN and infinities are not weights)."""
    return isinstance(weight, int | float) and not isinstance(weight, bool) and 0 <= weight < math.inf


def _unit_hash(key: str) -> float:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
