"""The drafter ``tandem distill`` trains: a few of the target's own layers and a cheap output head.

For a small drafter of a large-vocabulary target the output layer is the cost (SmolLM2's
49152x576 projection is ~10 ms of a 4-layer cut's ~12 ms per token in ONNX Runtime here).
So the drafter is

- the target's input embedding, frozen and *not* stored with the drafter's committed parts
  (it is derived from the target at pull time),
- the target's first ``num_layers`` decoder layers and final norm, trained,
- a *reduced-vocabulary draft head*: a linear layer onto the ``draft_vocab_size`` most
  frequent tokens of the distillation data, initialised from the target's output rows
  for those tokens (EAGLE-3's draft vocabulary, FR-Spec arXiv:2502.14856).

Verification stays lossless: the drafter's distribution q is exact and zero outside the
head. The module's forward returns full-vocabulary logits with :data:`DRAFT_FILL` outside
the head, so the edge bundle keeps the graph contract of :mod:`tandemspec.edge.bundle`
unchanged (softmax gives exactly 0 there; the value is finite so ``p * log p`` stays 0).
``logits_mode="draft"`` returns the head's own logits, as training wants.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

DRAFT_FILL = -1.0e4  # logit outside the draft head: exp underflows to exactly 0, finite in fp16 too
DRAFT_CONFIG_NAME = "draft_head.json"
COMMITTED_WEIGHTS_NAME = "committed.safetensors"
WEIGHTS_NAME = "model.safetensors"
EMBEDDING_KEY = "backbone.embed_tokens.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
LogitsMode = Literal["full", "draft"]


@dataclass(frozen=True)
class DraftHeadSpec:
    """What distinguishes the drafter from a cut of the target (stored as ``draft_head.json``)."""

    num_layers: int
    draft_vocab_size: int
    target_vocab_size: int
    source_layers: tuple[int, ...]  # target layer each drafter layer was initialised from


class DraftHeadModel(torch.nn.Module):
    """Backbone (embedding + layers + norm) of the target's family and a reduced output head."""

    def __init__(self, config: PretrainedConfig, spec: DraftHeadSpec) -> None:
        super().__init__()
        self.config = config  # the backbone's: vocab_size is the target's, as the edge sees it
        self.spec = spec
        self.backbone = AutoModel.from_config(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, spec.draft_vocab_size, bias=False)
        self.draft_ids: torch.Tensor  # [draft_vocab] target id of each head row
        self.register_buffer("draft_ids", torch.zeros(spec.draft_vocab_size, dtype=torch.int64))
        self.generation_config = GenerationConfig()
        self.logits_mode: LogitsMode = "full"

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        head = self.lm_head(out.last_hidden_state)  # [batch, seq, draft_vocab]
        if self.logits_mode == "draft":
            logits = head
        else:
            batch, seq, _ = head.shape
            index = self.draft_ids.view(1, 1, -1).expand(batch, seq, -1)
            logits = head.new_full((batch, seq, self.spec.target_vocab_size), DRAFT_FILL).scatter(-1, index, head)
        return CausalLMOutputWithPast(
            logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen input embedding: what is committed."""
        return {k: v for k, v in self.state_dict().items() if k != EMBEDDING_KEY}


def draft_head_from_target(
    target: Any, num_layers: int, draft_ids: torch.Tensor, source_layers: tuple[int, ...] | None = None
) -> DraftHeadModel:
    """A drafter initialised from ``target``: its embedding (frozen), layers ``source_layers``, norm, head rows."""
    target_config = target.config
    source = source_layers or tuple(range(num_layers))
    if len(source) != num_layers:
        raise ValueError(f"{num_layers} layers but {len(source)} source layers")
    fields = target_config.to_dict()
    fields |= {"num_hidden_layers": num_layers, "tie_word_embeddings": False, "dtype": "float32"}
    fields.pop("layer_types", None)
    config = AutoConfig.for_model(**fields)
    spec = DraftHeadSpec(
        num_layers=num_layers,
        draft_vocab_size=int(draft_ids.numel()),
        target_vocab_size=int(target_config.vocab_size),
        source_layers=tuple(source),
    )
    drafter = DraftHeadModel(config, spec)
    backbone = target.get_decoder() if hasattr(target, "get_decoder") else target.base_model
    state = backbone.state_dict()
    mine: dict[str, torch.Tensor] = {}
    for key in drafter.backbone.state_dict():
        parts = key.split(".")
        if parts[0] == "layers":
            parts[1] = str(source[int(parts[1])])
        mine[key] = state[".".join(parts)]
    drafter.backbone.load_state_dict(mine)
    output = target.get_output_embeddings().weight  # [vocab, hidden]
    with torch.no_grad():
        drafter.lm_head.weight.copy_(output[draft_ids])
        drafter.draft_ids.copy_(draft_ids)
    drafter.backbone.get_input_embeddings().weight.requires_grad_(False)
    drafter.generation_config = target.generation_config
    return drafter.eval()


def cut_layer_drafter(target: Any, num_layers: int) -> Any:
    """The baseline: the target's first ``num_layers`` layers with its full output head, untrained."""
    fields = target.config.to_dict() | {"num_hidden_layers": num_layers, "dtype": "float32"}
    fields.pop("layer_types", None)
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = target.state_dict()
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
    model.generation_config = target.generation_config
    return model.eval()


def save_drafter(drafter: DraftHeadModel, out_dir: Path, tokenizer_dir: Path, committed_dtype: torch.dtype) -> None:
    """Write the full drafter (fp32, all weights) and its committed parts (no embedding) into ``out_dir``.

    ``out_dir`` holds ``config.json`` (the backbone's), ``draft_head.json``, ``model.safetensors``,
    ``committed.safetensors`` and the tokenizer files; :func:`commit_parts` copies the small ones.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    drafter.config.save_pretrained(out_dir)
    drafter.generation_config.save_pretrained(out_dir)
    (out_dir / DRAFT_CONFIG_NAME).write_text(json.dumps(asdict(drafter.spec), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in drafter.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME))
    committed = {k: v.to(committed_dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    committed.pop(EMBEDDING_KEY)
    save_file(committed, str(out_dir / COMMITTED_WEIGHTS_NAME))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)


def commit_parts(drafter_dir: Path, out_dir: Path) -> None:
    """Copy what is committed of a drafter (no embedding, no tokenizer: both come from the target)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", DRAFT_CONFIG_NAME, COMMITTED_WEIGHTS_NAME):
        shutil.copyfile(drafter_dir / name, out_dir / name)  # default permissions, not safetensors' 0600


def _spec_from(path: Path) -> DraftHeadSpec:
    data = json.loads((path / DRAFT_CONFIG_NAME).read_text())
    data["source_layers"] = tuple(data["source_layers"])
    return DraftHeadSpec(**data)


def load_drafter(drafter_dir: Path) -> DraftHeadModel:
    """A saved drafter (``model.safetensors`` with every weight), float32, eval mode."""
    config = AutoConfig.from_pretrained(drafter_dir)
    drafter = DraftHeadModel(config, _spec_from(drafter_dir))
    drafter.load_state_dict(load_file(str(drafter_dir / WEIGHTS_NAME)))
    if (drafter_dir / "generation_config.json").is_file():
        drafter.generation_config = GenerationConfig.from_pretrained(drafter_dir)
    return drafter.float().eval()


def is_draft_head_dir(path: Path) -> bool:
    """Whether ``path`` holds a reduced-head drafter (rather than a plain Hugging Face model)."""
    return (path / DRAFT_CONFIG_NAME).is_file()


def committed_fingerprint(committed_dir: Path) -> str:
    """sha256 over the committed files, to tell whether an assembled drafter is stale."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in committed_dir.iterdir() if p.is_file()):
        digest.update(name.encode())
        digest.update((committed_dir / name).read_bytes())
    return digest.hexdigest()


def assemble_drafter(committed_dir: Path, target_dir: Path, out_dir: Path) -> DraftHeadModel:
    """Committed parts + the target's input embedding and tokenizer -> a full drafter folder."""
    from tandemspec.federated.distill.teacher import load_target

    target = load_target(target_dir)
    config = AutoConfig.from_pretrained(committed_dir)
    drafter = DraftHeadModel(config, _spec_from(committed_dir))
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in load_file(str(committed_dir / COMMITTED_WEIGHTS_NAME)).items()
    }
    state[EMBEDDING_KEY] = target.get_input_embeddings().weight.detach().clone()
    drafter.load_state_dict(state)
    drafter.generation_config = GenerationConfig.from_pretrained(committed_dir)
    del target
    save_drafter(drafter.eval(), out_dir, target_dir, committed_dtype=torch.float16)
    return drafter
