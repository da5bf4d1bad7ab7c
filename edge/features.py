"""Gate features per drafted token, in pure numpy (shared by the edge and gate training).

For each drafted token the uncertainty gate sees cheap statistics of the drafter's
distribution at that position plus the drafter's last hidden state:

``entropy``
    Shannon entropy (nats) of softmax(logits) - the U-HLM / FedHLM uncertainty signal.
``top1_prob``
    The largest probability - Hugging Face's ``assistant_confidence_threshold`` signal.
``margin``
    top-1 minus top-2 probability.
``position``
    Tokens since the last check: how many tokens lie between the last point the cloud
    verified and this token (0 = the first token after it), since acceptance of later
    tokens is conditional on earlier ones. One definition in every mode, for logging,
    training and use: in ``lossless`` it is the index in the draft block, counting on
    through the blocks of a pipelined frame still in flight; in ``gated`` it counts the
    trusted tokens since the last verified block, and a doubted token keeps the position
    the gate scored it at when the cloud is asked to verify from it. The gate clamps it to
    the largest position it was trained on (:class:`~tandemspec.edge.gate.OnnxGate`).

Statistics are taken on the *raw* distribution (temperature 1, no truncation) so the
gate's inputs do not depend on a request's sampling settings.
"""

from __future__ import annotations

import numpy as np

SCALAR_FEATURES: tuple[str, ...] = ("entropy", "top1_prob", "margin", "position")
NUM_SCALAR_FEATURES = len(SCALAR_FEATURES)


def feature_dim(hidden_size: int) -> int:
    """Length of one feature vector for a drafter of ``hidden_size``."""
    return NUM_SCALAR_FEATURES + hidden_size


def scalar_features(logits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Entropy, top-1 probability, top-1/top-2 margin and block position: [n, 4] float32.

    ``logits``: [n, vocab]; ``positions``: [n] index of each token within its block.
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    log_probs = shifted - log_z  # [n, vocab]
    probs = np.exp(log_probs)
    entropy = -(probs * log_probs).sum(axis=-1)  # [n]
    top2 = np.partition(probs, -2, axis=-1)[:, -2:]  # [n, 2]: second largest, largest
    top1_prob = top2[:, 1]
    margin = top2[:, 1] - top2[:, 0]
    return np.stack([entropy, top1_prob, margin, np.asarray(positions, np.float64)], axis=-1).astype(np.float32)


def token_features(logits: np.ndarray, hidden: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Full gate input per token: scalar features then the hidden state, [n, 4 + hidden] float32.

    ``logits``: [n, vocab] the drafter's logits that produced each token; ``hidden``:
    [n, hidden] the drafter's last hidden state at the same positions.
    """
    hidden = np.asarray(hidden, dtype=np.float32).reshape(len(logits), -1)
    return np.concatenate([scalar_features(logits, positions), hidden], axis=-1)


def split_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`token_features`: ([n, 4] scalars, [n, hidden] hidden states)."""
    features = np.asarray(features, dtype=np.float32)
    return features[..., :NUM_SCALAR_FEATURES], features[..., NUM_SCALAR_FEATURES:]
