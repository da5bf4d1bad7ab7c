"""Chat through ``tandem edge serve`` with the openai client, checked against transformers.

Starts ``tandem cloud serve`` on a pair's target and ``tandem edge serve`` on its edge
bundle (loopback subprocesses), asks a few questions greedily through the ``openai``
client, and compares each answer with transformers' ``generate`` on
``apply_chat_template(..., add_generation_prompt=True)`` of the same target.

    python scripts/chat_check.py [--pair ~/.cache/tandemspec/pairs/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandemspec.edge.demo import local_verifier
from tandemspec.net import free_port

QUESTIONS = ("What is the capital of France?", "Give me one tip for writing clear Python code.", "What is 12 times 7?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pair", type=Path, default=Path.home() / ".cache/tandemspec/pairs/smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.pair / "target")
    model = AutoModelForCausalLM.from_pretrained(args.pair / "target", dtype=torch.float32).eval()
    port = free_port()
    with local_verifier(args.pair / "target") as verifier:
        command = [sys.executable, "-m", "tandemspec.cli", "edge", "serve", "--cloud", verifier.address]
        command += ["--bundle", str(args.pair / "edge"), "--port", str(port)]
        daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(240):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            model_id = client.models.list().data[0].id
            for question in QUESTIONS:
                messages = [{"role": "user", "content": question}]
                response = client.chat.completions.create(
                    model=model_id,
                    messages=messages,
                    max_tokens=args.max_tokens,
                    temperature=0,  # type: ignore[arg-type]
                )
                inputs = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=args.max_tokens, do_sample=False)
                want = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                got = response.choices[0].message.content
                stats = (response.model_extra or {}).get("tandem_stats", {})
                print(f"Q: {question}\nA: {got!r}")
                print(
                    f"   identical to transformers generate: {got == want}; mode {stats.get('mode_used')}, "
                    f"fell back {stats.get('fell_back_to_local')}, {stats.get('num_generated')} tokens, "
                    f"{stats.get('mean_accepted_length', 0):.2f} tokens per verification round"
                )
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
