"""Chat through the local API renders the model's own chat template: greedy replies equal transformers'.

The pair is a tiny random Llama whose tokenizer carries a chat template (the target in
``tokenizer_config.json``, the drafter as ``chat_template.jinja``, the two places
transformers reads it from); the drafter is exported with ``tandem export``'s code and a
real verifier serves the target. The reference is the user's own pipeline:
``model.generate(tokenizer.apply_chat_template(messages, add_generation_prompt=True))``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandemspec.edge.api import ApiHandle, start_api_in_thread
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime

# A ChatML-like template that relies on what transformers' rendering does: trim_blocks
# (no newline after a block tag), raise_exception, bos/eos variables, add_generation_prompt.
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('unsupported role ' + message['role']) }}
{% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "write a loop"}],
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
        {"role": "user", "content": "and now subtract  "},
    ],
]
NEW_TOKENS = 12


@dataclass
class ChatPair:
    target_dir: Path
    api: ApiHandle
    runtime: EdgeRuntime


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Callable[..., Path]) -> Iterator[ChatPair]:
    import torch

    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread
    from tandemspec.federated.export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("chat-pair")
    target_dir = root / "target"
    shutil.copytree(tiny_model_dir("llama", 0), target_dir)
    config_path = target_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    drafter_dir = root / "drafter"
    shutil.copytree(tiny_model_dir("llama", 1, 0.05), drafter_dir)
    (drafter_dir / "chat_template.jinja").write_text(TEMPLATE)
    torch.set_num_threads(1)
    export_bundle(ExportConfig(drafter_dir=drafter_dir, out_dir=root / "edge"))
    with (
        serve_in_thread(CloudConfig(model_dir=target_dir, port=0)) as server,
        EdgeRuntime(EdgeConfig(cloud=server.address, bundle=root / "edge", threads=1)) as runtime,
        start_api_in_thread(runtime) as api,
    ):
        yield ChatPair(target_dir, api, runtime)


def _transformers_reply(target_dir: Path, messages: list[dict[str, Any]]) -> tuple[list[int], str]:
    """Prompt ids and greedy reply of the user's own pipeline (float32, as the verifier on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return prompt, tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_greedy_chat_equals_transformers_generate_on_the_chat_template(chat_pair: ChatPair, conversation: int) -> None:
    from openai import OpenAI

    messages = CONVERSATIONS[conversation]
    prompt, expected = _transformers_reply(chat_pair.target_dir, messages)
    assert prompt.count(1) == 1  # one BOS: the template's, none added by encoding (add_special_tokens=False)
    client = OpenAI(base_url=chat_pair.api.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=NEW_TOKENS,
        temperature=0,  # type: ignore[arg-type]
    )
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt)
    assert reply.choices[0].message.content == expected
    stats = reply.model_extra["tandem_stats"] if reply.model_extra else {}
    assert stats["mode_used"] == "lossless" and not stats["fell_back_to_local"]
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=NEW_TOKENS,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_text_parts_are_the_text_and_the_template_can_refuse(chat_pair: ChatPair) -> None:
    parts = [{"type": "text", "text": "write"}, {"type": "text", "text": "a loop"}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 6, "temperature": 0}
    joined = {**body, "messages": [{"role": "user", "content": "write\na loop"}]}
    with httpx.Client(base_url=chat_pair.api.base_url, timeout=60) as http:
        assert (
            http.post("/v1/chat/completions", json=body).json()["choices"]
            == (http.post("/v1/chat/completions", json=joined).json()["choices"])
        )
        refused = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "tool", "content": "x"}]})
        assert refused.status_code == 400 and "unsupported role tool" in refused.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json=joined).status_code == 200  # still serving
