"""A classifier's scores as probabilities, as its contract describes them: the suite's own graphs
end in a softmax (``extra["outputs_probabilities"]`` true, the default), most imported ones in
logits, which are given probabilities here. Serving and the benchmark's reference server both
answer with these, so both do the same work."""

from __future__ import annotations

import numpy as np

from contract import ModelContract


def softmax(logits: np.ndarray) -> np.ndarray:
    """One row of logits -> float32 probabilities (computed in float64, shifted by the maximum)."""
    shifted = logits.astype(np.float64) - logits.max()
    exp = np.exp(shifted)
    return (exp / exp.sum()).astype(np.float32)


def probabilities(scores: np.ndarray, contract: ModelContract) -> np.ndarray:
    """One row of the classifier's output -> probabilities."""
    return scores if contract.extra.get("outputs_probabilities", True) else softmax(scores)
