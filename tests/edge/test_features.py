"""Gate features: entropy, top-1 probability, margin, block position, hidden state."""

from __future__ import annotations

import numpy as np

from tandemspec.edge.features import NUM_SCALAR_FEATURES, feature_dim, scalar_features, split_features, token_features


def test_uniform_and_peaked_distributions() -> None:
    vocab = 8
    uniform = np.zeros((1, vocab))
    peaked = np.array([[10.0, 0, 0, 0, 0, 0, 0, 0]])
    two_way = np.log(np.array([[0.6, 0.4, 1e-12, 1e-12, 1e-12, 1e-12, 1e-12, 1e-12]]))
    f = scalar_features(np.concatenate([uniform, peaked, two_way]), np.array([0, 1, 2]))
    assert f.dtype == np.float32 and f.shape == (3, 4)
    np.testing.assert_allclose(f[0], [np.log(vocab), 1 / vocab, 0.0, 0.0], atol=1e-6)
    assert f[1, 0] < 0.01 and f[1, 1] > 0.99 and f[1, 2] > 0.99 and f[1, 3] == 1
    np.testing.assert_allclose(f[2, :3], [-(0.6 * np.log(0.6) + 0.4 * np.log(0.4)), 0.6, 0.2], atol=1e-5)


def test_token_features_append_the_hidden_state() -> None:
    rng = np.random.default_rng(0)
    logits, hidden = rng.normal(size=(5, 50)), rng.normal(size=(5, 16)).astype(np.float32)
    features = token_features(logits, hidden, np.arange(5))
    assert features.shape == (5, feature_dim(16)) == (5, NUM_SCALAR_FEATURES + 16)
    scalars, hidden_back = split_features(features)
    np.testing.assert_array_equal(hidden_back, hidden)
    np.testing.assert_array_equal(scalars, scalar_features(logits, np.arange(5)))
    assert np.isfinite(scalar_features(np.array([[1e4, -1e4, 0.0]]), np.zeros(1))).all()  # no overflow
