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
