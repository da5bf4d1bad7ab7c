"""Shared fixtures: a tiny tokenizer and tiny random models of several families.

Every architecture path is exercised without downloaded weights (docs/architecture.md "Models").
Fixtures that need torch/transformers import them inside, so edge-only tests never do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TINY_VOCAB = 384
FAMILIES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with ~384 tokens trained on a few stdlib modules (pad 0, bos 1, eos 2)."""
    from tandemspec.federated.reference.corpus import read_texts, split_corpus
    from tandemspec.federated.reference.tokenizer import save_tokenizer, train_tokenizer

    split = split_corpus()
    texts = read_texts(split.train[:40])
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(texts, TINY_VOCAB), out, model_max_length=512)
    return out


def build_tiny_model(family: str, vocab_size: int, seed: int, hidden: int = 64, layers: int = 2):  # type: ignore[no-untyped-def]
    """A randomly initialised causal LM of ``family`` (llama, qwen2 or gpt2)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
        model = LlamaForCausalLM(config)
    elif family == "qwen2":
        config = Qwen2Config(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
        model = Qwen2ForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    # Random init gives near-uniform outputs; sharpen them so greedy/sampling paths differ
    # between models and drafts get both accepted and rejected.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Callable[..., Path]:
    """Factory: ``tiny_model_dir(family, seed, noise)`` -> a saved model folder with tokenizer files.

    ``noise > 0`` returns the seed-0 model of the family with Gaussian noise of that
    relative scale added (drawn with ``seed``): a drafter that often, not always, agrees
    with the seed-0 target.
    """
    import shutil

    import torch

    cache: dict[tuple[str, int, float], Path] = {}

    def make(family: str, seed: int = 0, noise: float = 0.0) -> Path:
        key = (family, seed, noise)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{seed}")
            model = build_tiny_model(family, TINY_VOCAB, 0 if noise > 0 else seed)
            if noise > 0:
                generator = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for parameter in model.parameters():
                        scale = noise * parameter.abs().mean()
                        parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
            model.save_pretrained(out)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(tiny_tokenizer_dir / name, out / name)
            cache[key] = out
        return cache[key]

    return make


DRAFTER_NOISE = 0.05  # relative noise of the tiny drafters: they agree with the target often, not always


@pytest.fixture(scope="session")
def tiny_bundle_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Callable[..., Path]
) -> Callable[..., Path]:
    """Factory: ``tiny_bundle_dir(family, seed=1, noise=DRAFTER_NOISE)`` -> an exported edge bundle.

    The drafter is the seed-0 model of the family perturbed with ``noise`` (a drafter for
    the ``tiny_model_dir(family, 0)`` target), exported with ``tandem export``'s code.
    """
    import torch

    from tandemspec.federated.export import ExportConfig, export_bundle

    cache: dict[tuple[str, int, float], Path] = {}

    def make(family: str, seed: int = 1, noise: float = DRAFTER_NOISE) -> Path:
        key = (family, seed, noise)
        if key not in cache:
            torch.set_num_threads(1)
            out = tmp_path_factory.mktemp(f"bundle-{family}-{seed}") / "edge"
            export_bundle(ExportConfig(drafter_dir=tiny_model_dir(family, seed, noise), out_dir=out))
            cache[key] = out
        return cache[key]

    return make
