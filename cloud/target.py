"""The target model: loading, per-session KV caches, and one forward pass over many sessions.

Each session owns a :class:`SessionKV` (per layer keys and values of shape
``[1, kv_heads, length, head_dim]``). A batched step stacks the sessions' caches into one
left-padded batch cache, right-pads the new tokens, and gives every row its own position
ids and an attention mask that hides the padding::

    row i:  [ pad ... pad | past_i (L_i) | new_i (n_i) | pad ... ]
             <--- Lmax - L_i ---><------- Lmax ------><--- Nmax --->

Only the logit rows a caller needs are computed (``ForwardRow.num_logits``, passed to the
model as ``logits_to_keep``): none for a prefill, the judged rows for a verify step, the
last one for a generate step. They stay on the model's device as torch tensors, where
:mod:`tandemspec.cloud.probs` turns them into argmaxes and probabilities, so only a few
numbers per row cross to the host.

HF's causal mask then lets new token j of row i see exactly its own past and new tokens
0..j, so each row computes what it would alone (up to float rounding). Absolute-position
models (GPT-2) get the right positions from ``position_ids``.

Draft trees (``ForwardRow.parents``): a row's new tokens form a tree instead of a chain.
Each token's position is its past length plus its depth, and a 4-D float mask
``[B, 1, Nmax, Lmax + Nmax]`` (0 = attend, the dtype's minimum = hidden; HF uses a 4-D mask
as given, for Llama, Qwen2 and GPT-2 alike) lets it see its row's past, its ancestors and
itself: each tree path computes what it would as a chain. A batch with no tree keeps the
2-D padding mask. The cache then holds every fed token; :meth:`SessionKV.select` keeps
the accepted path.

Cost: stacking copies each session's KV once per batched step (as HF's own DynamicCache
does on every append); rows are cloned back out so that no session pins a batch tensor.
A batch of one session runs on its cache directly. A paged-attention kernel would avoid
the copy; for the model sizes served here the copy is small next to attention itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from tandemspec.cloud.config import DeviceChoice, DtypeChoice
from tandemspec.sampling import DraftTree, chain_parents

logger = logging.getLogger(__name__)

KVLayer = tuple[torch.Tensor, torch.Tensor]  # keys, values: [1, kv_heads, length, head_dim]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SessionKV:
    """One session's KV cache; ``layers`` is empty when nothing has been fed yet."""

    layers: tuple[KVLayer, ...]
    length: int

    @staticmethod
    def empty() -> SessionKV:
        return SessionKV(layers=(), length=0)

    def crop(self, length: int) -> SessionKV:
        """The first ``length`` positions (a view, no copy): KV rollback."""
        assert 0 <= length <= self.length, (length, self.length)
        if length == self.length:
            return self
        if length == 0:
            return SessionKV.empty()
        return SessionKV(tuple((k[:, :, :length], v[:, :, :length]) for k, v in self.layers), length)

    def select(self, length: int, positions: Sequence[int]) -> SessionKV:
        """The first ``length`` positions, then ``positions`` (each >= ``length``, in order): a tree's
        accepted path. A crop (no copy) when the positions follow on from ``length``."""
        assert all(length <= position < self.length for position in positions), (length, positions, self.length)
        if list(positions) == list(range(length, length + len(positions))):
            return self.crop(length + len(positions))
        index = torch.tensor([*range(length), *positions], dtype=torch.long, device=self.layers[0][0].device)
        layers = tuple((k.index_select(2, index), v.index_select(2, index)) for k, v in self.layers)
        return SessionKV(layers, len(index))


@dataclass(frozen=True)
class ForwardRow:
    """One session's share of a forward pass: its cache and the tokens to feed after it."""

    kv: SessionKV
    input_ids: tuple[int, ...]
    num_logits: int | None = None  # logits for the last this-many fed tokens (None: all of them)
    # A tree over the fed tokens: parents[j] < j is the fed token that token j follows (-1 =
    # the past). Empty: a chain (each token follows the previous one).
    parents: tuple[int, ...] = ()

    @property
    def logits_kept(self) -> int:
        n = len(self.input_ids)
        return n if self.num_logits is None else min(self.num_logits, n)


@dataclass(frozen=True)
class ForwardOutput:
    """Result for one row: logits at its last ``num_logits`` fed tokens and the extended cache."""

    logits: torch.Tensor  # [num_logits, vocab] float32 on the model's device; row j predicts the token after it
    kv: SessionKV  # past + the fed tokens
    compute_ms: float  # wall time of the whole (possibly batched) forward


def resolve_device(choice: DeviceChoice) -> torch.device:
    """``auto`` picks CUDA when present."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(choice)


def resolve_dtype(choice: DtypeChoice, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 (else float16) on CUDA, float32 on CPU (bf16 is slow on CPUs)."""
    if choice != "auto":
        return _DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attention(choice: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The attention implementation to load (None: the model's default, SDPA where it has one).

    ``auto``: eager attention for 16-bit weights on a CPU. There PyTorch's SDPA kernel gives a
    position other logits in a pass over several tokens than in a one-token step (3 of 16
    bench prompts of the reference pair then decode differently in bf16), which would break
    "lossless output is cloud-only output, token for token"; with eager attention the
    reference pair's passes of up to 17 tokens give the logits of one-token steps bit for bit
    (``scripts/pass_invariance.py``). Not every model's do (SmolLM2 still differs on 1 of 4
    prompts in bf16, docs/benchmark.md): float32, the CPU default, is the exact choice. float32
    and CUDA keep the model's default attention.
    """
    if choice != "auto":
        return choice
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return "eager"
    return None


class TargetModel:
    """A causal LM that runs batched forward passes over sessions' KV caches."""

    def __init__(self, model: PreTrainedModel, device: torch.device, name: str, threads: int = 0) -> None:
        self.model = model
        self.device = device
        self.name = name
        self.threads = threads  # torch intra-op CPU threads of each forward (0: torch's own choice)
        config = model.config
        self.vocab_size: int = int(config.vocab_size)
        self.max_positions: int | None = _max_positions(config)
        self.pad_id = 0  # any valid id: padded tokens are masked out
        self.kv_bytes_per_token = self._measure_kv_bytes_per_token()

    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: DeviceChoice = "auto",
        dtype: DtypeChoice = "auto",
        attention: str = "auto",
        threads: int = 0,
    ) -> TargetModel:
        """Load a Hugging Face causal LM folder onto the chosen device and dtype (``attention``:
        see :func:`resolve_attention`; ``threads``: torch CPU threads per forward, 0 = torch's)."""
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(
                f"no target model at {model_dir} (expected a Hugging Face folder with config.json; "
                "pass --model, or build the reference pair with `tandem train-reference`)"
            )
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        implementation = resolve_attention(attention, torch_device, torch_dtype)
        extra = {} if implementation is None else {"attn_implementation": implementation}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **extra)
        model.to(torch_device).eval()
        logger.info("loaded target %s on %s as %s (%s attention)", model_dir, torch_device, torch_dtype, implementation)
        return cls(model, torch_device, Path(model_dir).name, threads)

    @property
    def attention(self) -> str:
        """The attention implementation the model runs."""
        return str(getattr(self.model.config, "_attn_implementation", None) or "default")

    @property
    def dtype_name(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def prefill(self, input_ids: Sequence[int]) -> ForwardOutput:
        """Feed a prompt (or any tokens) with no past; a batch of one, no logits kept."""
        return self.forward([ForwardRow(SessionKV.empty(), tuple(input_ids), num_logits=0)])[0]

    def forward(self, rows: Sequence[ForwardRow]) -> list[ForwardOutput]:
        """One forward pass over ``rows`` (each with at least one new token)."""
        assert rows and all(row.input_ids for row in rows)
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # per calling thread: the scheduler's worker inherits nothing
        start = time.perf_counter()
        with torch.inference_mode():
            if len(rows) == 1:
                logits, outputs = self._forward_one(rows[0])
            else:
                logits, outputs = self._forward_batch(rows)
        compute_ms = (time.perf_counter() - start) * 1e3
        return [
            ForwardOutput(logits=row_logits, kv=kv, compute_ms=compute_ms)
            for row_logits, kv in zip(logits, outputs, strict=True)
        ]

    def _forward_one(self, row: ForwardRow) -> tuple[list[torch.Tensor], list[SessionKV]]:
        n = len(row.input_ids)
        past = row.kv.length
        input_ids = torch.tensor([row.input_ids], dtype=torch.long, device=self.device)  # [1, n]
        mask = None
        if row.parents:
            position_ids = (past + torch.tensor(DraftTree(row.parents).depths(), device=self.device))[None]  # [1, n]
            mask = self._tree_mask([row], past, n)  # [1, 1, n, past + n]
        else:
            position_ids = torch.arange(past, past + n, device=self.device)[None]  # [1, n]
        cache = self._cache(list(row.kv.layers))
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=self._logits_to_keep(row.logits_kept),
        )
        logits = out.logits[0, :, : self.vocab_size].float()  # [num_logits, vocab]
        layers = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        return [logits], [SessionKV(layers, past + n)]

    def _forward_batch(self, rows: Sequence[ForwardRow]) -> tuple[list[torch.Tensor], list[SessionKV]]:
        batch = len(rows)
        past_lengths = [row.kv.length for row in rows]
        new_lengths = [len(row.input_ids) for row in rows]
        max_past, max_new = max(past_lengths), max(new_lengths)
        input_ids = torch.full((batch, max_new), self.pad_id, dtype=torch.long)  # [B, Nmax]
        attention_mask = torch.zeros(batch, max_past + max_new, dtype=torch.long)  # [B, Lmax + Nmax]
        position_ids = torch.zeros(batch, max_new, dtype=torch.long)  # [B, Nmax]
        position_cap = (self.max_positions or 1 << 30) - 1
        for i, row in enumerate(rows):
            input_ids[i, : new_lengths[i]] = torch.tensor(row.input_ids)
            attention_mask[i, max_past - past_lengths[i] : max_past + new_lengths[i]] = 1
            # Padded tail positions are clamped so absolute-position tables are never overrun.
            position_ids[i] = torch.arange(past_lengths[i], past_lengths[i] + max_new).clamp(max=position_cap)
            if row.parents:
                position_ids[i, : new_lengths[i]] = past_lengths[i] + torch.tensor(DraftTree(row.parents).depths())
        mask = self._tree_mask(rows, max_past, max_new) if any(row.parents for row in rows) else attention_mask
        # New tokens are right-padded, so row i wants columns [n_i - keep_i, n_i): keep every
        # column from the earliest of those starts (one slice serves the whole batch).
        first_kept = min(n - row.logits_kept for n, row in zip(new_lengths, rows, strict=True))
        cache = self._cache(self._stack_past(rows, max_past))
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=position_ids.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=self._logits_to_keep(max_new - first_kept),
        )
        all_logits = out.logits[:, :, : self.vocab_size].float()  # [B, Nmax - first_kept, vocab]
        merged = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        logits, outputs = [], []
        for i in range(batch):
            lo, hi = max_past - past_lengths[i], max_past + new_lengths[i]
            # Clone so that the session does not keep the whole batch tensor alive.
            layers = tuple((k[i : i + 1, :, lo:hi].clone(), v[i : i + 1, :, lo:hi].clone()) for k, v in merged)
            end = new_lengths[i] - first_kept
            logits.append(all_logits[i, end - rows[i].logits_kept : end])
            outputs.append(SessionKV(layers, past_lengths[i] + new_lengths[i]))
        return logits, outputs

    def _tree_mask(self, rows: Sequence[ForwardRow], max_past: int, max_new: int) -> torch.Tensor:
        """The 4-D float mask of a step with trees: [B, 1, Nmax, Lmax + Nmax] (see the module doc).

        Row i's past sits left-padded in columns ``[Lmax - L_i, Lmax)``, its new tokens in
        ``[Lmax, Lmax + n_i)``; a padded query attends only to itself (no empty softmax).
        """
        allowed = torch.zeros(len(rows), max_new, max_past + max_new, dtype=torch.bool)
        for i, row in enumerate(rows):
            n, past = len(row.input_ids), row.kv.length
            allowed[i, :n, max_past - past : max_past] = True
            allowed[i, :n, max_past : max_past + n] = torch.from_numpy(ancestor_matrix(row.parents or chain_parents(n)))
            padded = torch.arange(n, max_new)
            allowed[i, padded, max_past + padded] = True
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.model.dtype).min)
        return mask[:, None].to(self.device)

    def _stack_past(self, rows: Sequence[ForwardRow], max_past: int) -> list[KVLayer]:
        """Left-pad every row's past to ``max_past``: per layer [B, kv_heads, Lmax, head_dim]."""
        if max_past == 0:
            return []
        template = next(row.kv.layers for row in rows if row.kv.length > 0)
        stacked: list[KVLayer] = []
        for layer_index, (keys, values) in enumerate(template):
            shape = (len(rows), keys.shape[1], max_past, keys.shape[3])
            batch_keys = keys.new_zeros(shape)
            batch_values = values.new_zeros((len(rows), values.shape[1], max_past, values.shape[3]))
            for i, row in enumerate(rows):
                if row.kv.length == 0:
                    continue
                row_keys, row_values = row.kv.layers[layer_index]
                batch_keys[i, :, max_past - row.kv.length :] = row_keys[0]
                batch_values[i, :, max_past - row.kv.length :] = row_values[0]
            stacked.append((batch_keys, batch_values))
        return stacked

    def _logits_to_keep(self, num: int) -> int | torch.Tensor:
        # HF reads an int 0 as "keep all"; an empty index tensor keeps none.
        return num if num > 0 else torch.zeros(0, dtype=torch.long, device=self.device)

    def _cache(self, layers: list[KVLayer]) -> DynamicCache:
        if not layers:
            return DynamicCache(config=self.model.config)
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _measure_kv_bytes_per_token(self) -> int:
        """KV bytes one token occupies, measured with a one-token forward (also a warm-up)."""
        out = self.prefill([self.pad_id])
        return sum(k.nbytes + v.nbytes for k, v in out.kv.layers)


def ancestor_matrix(parents: Sequence[int]) -> np.ndarray:
    """[n, n] bool: entry (j, a) is True when token a is token j itself or one of its ancestors."""
    n = len(parents)
    out = np.zeros((n, n), dtype=bool)
    for j, parent in enumerate(parents):
        if parent >= 0:
            out[j] = out[parent]
        out[j, j] = True
    return out


def _max_positions(config: object) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
