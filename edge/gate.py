"""The uncertainty gate on the edge: ONNX Runtime inference, numpy features in, p(accept) out.

The graph (built by :mod:`tandemspec.federated.gate`) takes ``features`` [batch, dim]
float32 - the vectors of :func:`tandemspec.edge.features.token_features` - and returns
``p_accept`` [batch], the estimated probability that the target accepts each drafted
token. No torch here: the edge runs the gate on ONNX Runtime only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tandemspec.edge.features import token_features

logger = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "p_accept"


class OnnxGate:
    """A gate graph on the CPU provider; :meth:`predict` maps features to accept probabilities."""

    def __init__(self, path: Path, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        outputs = {o.name for o in self._session.get_outputs()}
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise ValueError(f"{path}: a gate graph takes '{INPUT_NAME}' and returns '{OUTPUT_NAME}'")
        dim = inputs[0].shape[1]
        self.feature_dim = dim if isinstance(dim, int) else None
        logger.debug("loaded gate %s (feature dim %s)", path, self.feature_dim)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Accept probability per row: features [n, dim] -> [n] float32."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or (self.feature_dim is not None and x.shape[1] != self.feature_dim):
            raise ValueError(f"gate expects features [n, {self.feature_dim}], got {x.shape}")
        (p_accept,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return np.asarray(p_accept, np.float32).reshape(len(x))


class SurvivalDraftLength:
    """Dynamic draft length from the gate (EAGLE-2, arXiv:2406.16858: calibrated confidence predicts acceptance).

    The gate estimates, per drafted token, the chance the target accepts it; the block is
    cut when the estimated chance that every token so far survives falls below
    ``min_survival``, or at ``max_length``. A :class:`~tandemspec.edge.decoder.DraftPolicy`.
    """

    def __init__(self, gate: OnnxGate, min_survival: float, max_length: int) -> None:
        if not 0.0 <= min_survival <= 1.0:
            raise ValueError(f"min_survival must be in [0, 1], got {min_survival}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.gate = gate
        self.min_survival = min_survival
        self.max_length = max_length
        self._survival = 1.0

    def keep_drafting(self, index: int, logits: np.ndarray, hidden: np.ndarray) -> bool:
        """``index`` tokens drafted in this block; ``logits``/``hidden`` produced the last of them."""
        if index == 1:  # a new block
            self._survival = 1.0
        features = token_features(logits[None], hidden[None], np.array([index - 1]))  # [1, feature_dim]
        self._survival *= float(self.gate.predict(features)[0])
        return index < self.max_length and self._survival >= self.min_survival
