"""The drafter on ONNX Runtime, with a preallocated KV cache that rolls back by length.

The graph (see :mod:`tandemspec.edge.bundle`) returns the keys and values of the new
tokens only; :class:`OnnxDrafter` appends them into buffers sized once for the bundle's
maximum context, so decoding allocates no cache per token and a rollback after a rejected
draft is a change of ``length`` (the stale tail is simply overwritten later).

The cache is the state of one generation; concurrent generations each use a
:meth:`OnnxDrafter.fork`, which shares the (thread-safe) ONNX Runtime session and owns its cache.

Draft trees (:mod:`tandemspec.edge.tree`) need no other graph: the exported graph's batch
axis is dynamic, so :meth:`OnnxDrafter.extend_branches` feeds one token to each of several
branches at once, each row's past being the cached prefix (tiled along the batch axis)
followed by that branch's own ancestors. Branch keys and values never enter the cache; after
a verdict the accepted tokens are fed as usual (one call, which also feeds the correction).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from tandemspec.edge.bundle import Bundle, BundleManifest

logger = logging.getLogger(__name__)

_WARMUP_TOKENS = 4


@dataclass(frozen=True)
class DrafterOptions:
    """How the drafter runs: execution providers, threads and cache capacity."""

    providers: tuple[str, ...] | None = None  # None = CUDA when available, else CPU
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default
    capacity: int | None = None  # tokens the KV cache holds; None = the bundle's max positions


def choose_providers(requested: tuple[str, ...] | None = None) -> list[str]:
    """Execution providers to use: the requested ones that exist, else CUDA (if present) then CPU."""
    available = ort.get_available_providers()
    if requested:
        chosen = [p for p in requested if p in available]
        if not chosen:
            raise ValueError(f"none of the providers {requested} is available (have {available})")
        return chosen
    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in preferred if p in available]


class OnnxDrafter:
    """A causal LM on ONNX Runtime that keeps its own KV cache for one sequence."""

    def __init__(self, bundle: Bundle, options: DrafterOptions | None = None) -> None:
        options = options or DrafterOptions()
        self.manifest: BundleManifest = bundle.manifest
        m = self.manifest
        self.capacity = min(options.capacity or m.max_positions, m.max_positions)
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.intra_op_threads > 0:
            session_options.intra_op_num_threads = options.intra_op_threads
        self.providers = choose_providers(options.providers)
        self._session = ort.InferenceSession(str(bundle.drafter_path), session_options, providers=self.providers)
        self._past_names = [f"past.{i}.{kind}" for i in range(m.num_layers) for kind in ("key", "value")]
        self._output_names = ["logits", "hidden"] + [
            f"present.{i}.{kind}" for i in range(m.num_layers) for kind in ("key", "value")
        ]
        self._check_graph()
        self._positions = np.arange(self.capacity, dtype=np.int64)[None, :]  # [1, capacity], read-only
        self._mask = np.ones((1, self.capacity), dtype=np.int64)  # [1, capacity], read-only
        self._new_cache()
        self.warm_up()

    def _new_cache(self) -> None:
        m = self.manifest
        # One buffer per layer input: [1, capacity, kv_heads, head_dim]; a prefix slice of
        # it is C-contiguous, so ONNX Runtime reads it without a copy on the CPU provider.
        # np.zeros maps zeroed pages lazily: a cache costs memory only for the context it holds.
        self._cache = [np.zeros((1, self.capacity, m.num_kv_heads, m.head_dim), np.float32) for _ in self._past_names]
        self._tokens = np.zeros(self.capacity, dtype=np.int64)  # ids whose keys/values are cached
        self._length = 0

    def fork(self) -> OnnxDrafter:
        """A drafter on the same session with an empty cache of its own (for a concurrent generation)."""
        other = copy.copy(self)  # shares the session, names, positions and mask (never written)
        other._new_cache()
        return other

    def _check_graph(self) -> None:
        inputs = {i.name for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        missing = ({"input_ids", "attention_mask", "position_ids", *self._past_names} - inputs) | (
            set(self._output_names) - outputs
        )
        if missing:
            raise ValueError(f"drafter graph does not match its manifest; missing {sorted(missing)}")

    @property
    def past_names(self) -> list[str]:
        """The graph's past inputs, ``past.{layer}.{key|value}``, in the order results use."""
        return self._past_names

    @property
    def length(self) -> int:
        """Tokens currently in the cache."""
        return self._length

    @property
    def tokens(self) -> np.ndarray:
        """The cached token ids: [length] (a view; do not modify)."""
        return self._tokens[: self._length]

    def warm_up(self) -> None:
        """Run a short prefill and one step so the first real call pays no initialisation cost."""
        warm = min(_WARMUP_TOKENS, self.capacity - 1)
        self.rollback(0)
        self.extend([self.manifest.bos_id or 0] * warm)
        self.extend([self.manifest.bos_id or 0])
        self.rollback(0)

    def reset(self, prompt_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Start a new sequence: returns logits [vocab] and hidden [hidden] at its last token."""
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token (a BOS id)")
        self.rollback(0)
        logits, hidden = self.extend(prompt_ids)
        return logits[-1], hidden[-1]

    def extend(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Append tokens: returns logits [n, vocab] and hidden [n, hidden] at each of them."""
        n = len(ids)
        start, end = self._length, self._length + n
        if n == 0:
            raise ValueError("extend needs at least one token")
        if end > self.capacity:
            raise ValueError(f"context of {end} tokens exceeds the drafter's capacity of {self.capacity}")
        input_ids = np.asarray(ids, dtype=np.int64)[None, :]  # [1, n]
        if input_ids.min() < 0 or input_ids.max() >= self.manifest.vocab_size:
            raise ValueError(f"token id outside the vocabulary of {self.manifest.vocab_size}")
        feed: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "attention_mask": self._mask[:, :end],  # [1, total]
            "position_ids": self._positions[:, start:end],  # [1, n]
        }
        for name, buffer in zip(self._past_names, self._cache, strict=True):
            feed[name] = buffer[:, :start]  # [1, past, kv_heads, head_dim]
        outputs = self._session.run(self._output_names, feed)
        for buffer, present in zip(self._cache, outputs[2:], strict=True):
            buffer[:, start:end] = present  # present: [1, n, kv_heads, head_dim]
        self._tokens[start:end] = input_ids[0]
        self._length = end
        return outputs[0][0], outputs[1][0]  # [n, vocab], [n, hidden]

    def extend_branches(
        self, ids: Sequence[int], branch_past: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """One token after each of ``len(ids)`` branches of the cached sequence (the cache is unchanged).

        ``branch_past``: per past input (``past.{layer}.{key|value}``), the branches' ancestors'
        keys or values, [B, depth, kv_heads, head_dim] (None: the branches start at the cache's
        end). Returns logits [B, vocab], the last hidden state [B, hidden] and per past input the
        new token's keys or values, [B, 1, kv_heads, head_dim].
        """
        batch, start = len(ids), self._length
        depth = 0 if branch_past is None else branch_past[0].shape[1]
        if batch == 0:
            raise ValueError("extend_branches needs at least one branch")
        if start + depth + 1 > self.capacity:
            raise ValueError(f"context of {start + depth + 1} tokens exceeds the drafter's capacity of {self.capacity}")
        input_ids = np.asarray(ids, dtype=np.int64)[:, None]  # [B, 1]
        if input_ids.min() < 0 or input_ids.max() >= self.manifest.vocab_size:
            raise ValueError(f"token id outside the vocabulary of {self.manifest.vocab_size}")
        total = start + depth + 1
        feed: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "attention_mask": np.ones((batch, total), dtype=np.int64),  # [B, total]
            "position_ids": np.full((batch, 1), start + depth, dtype=np.int64),  # [B, 1]
        }
        for index, (name, buffer) in enumerate(zip(self._past_names, self._cache, strict=True)):
            prefix = np.broadcast_to(buffer[:, :start], (batch, start, *buffer.shape[2:]))  # [B, past, h, d], a view
            # One copy per layer: the prefix tiled along the batch axis, then the branches' ancestors.
            parts = [prefix] if branch_past is None else [prefix, branch_past[index]]
            feed[name] = np.concatenate(parts, axis=1)
        outputs = self._session.run(self._output_names, feed)
        # [B, vocab], [B, hidden], per past input [B, 1, kv_heads, head_dim]
        return outputs[0][:, -1], outputs[1][:, -1], outputs[2:]

    def rollback(self, length: int) -> None:
        """Forget every token from ``length`` on (the cache keeps ``length`` tokens)."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self._length} tokens")
        self._length = length
