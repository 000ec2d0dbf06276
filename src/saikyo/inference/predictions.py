"""Logits -> probabilities -> top-k, vectorised over a batch."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest probabilities per row, highest first."""
    k = min(k, probs.shape[1])
    idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(probs, idx, axis=1)
    # Stable on ties so that equal probabilities keep ascending class order.
    order = np.lexsort((idx, -vals), axis=1) if k > 1 else np.zeros_like(idx)
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
