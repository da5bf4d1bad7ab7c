"""The bundled reference pair end to end: lossless greedy equals the target alone, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandemspec.bench.prompts import load_prompts
from tandemspec.edge.decoder import GenerationRequest
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime

PAIR = Path(__file__).resolve().parents[2] / "models" / "reference"
pytestmark = pytest.mark.skipif(not (PAIR / "edge" / "manifest.json").exists(), reason="reference pair not built")
NEW_TOKENS = 32


@pytest.mark.parametrize(
    "pipeline, min_survival", [(False, None), (True, None), (True, 0.5)], ids=["sync", "pipelined", "gate-length"]
)
def test_reference_lossless_greedy_is_target_greedy(pipeline: bool, min_survival: float | None) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    target = AutoModelForCausalLM.from_pretrained(PAIR / "target", dtype=torch.float32).eval()
    prompts = load_prompts()[:2]  # held-out code the pair never trained on
    with (
        serve_in_thread(CloudConfig(model_dir=PAIR / "target", port=0)) as server,
        EdgeRuntime(
            EdgeConfig(
                cloud=server.address, bundle=PAIR / "edge", pipeline=pipeline, min_survival=min_survival, draft_length=6
            )
        ) as runtime,
    ):
        for text in prompts:
            prompt = runtime.tokenizer.encode_prompt(text)
            result = runtime.decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=NEW_TOKENS))
            with torch.no_grad():
                expected = target.generate(
                    torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
                )[0, len(prompt) :].tolist()
            assert len(result.token_ids) == NEW_TOKENS  # these prompts do not reach EOS early
            assert list(result.token_ids) == expected
            assert result.stats.mode_used == "lossless" and not result.stats.fell_back_to_local
            assert result.stats.num_target_passes < result.stats.num_generated  # drafts were accepted
