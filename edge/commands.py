"""``tandem edge generate`` and ``tandem edge serve``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from tandemspec.config import ConfigError
from tandemspec.edge.bundle import BundleError
from tandemspec.edge.client import CloudRefused
from tandemspec.edge.decoder import GenerationRequest
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime, config_from_args
from tandemspec.edge.stats import GenerationResult
from tandemspec.types import SamplingParams

logger = logging.getLogger(__name__)


def read_prompts(path: Path) -> Iterator[str]:
    """Prompts of a JSONL file, one ``{"prompt": "..."}`` per line (blank lines skipped)."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON: {error}") from error
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: expected {{"prompt": "..."}}')
            yield record["prompt"]


def result_record(prompt: str, result: GenerationResult) -> dict[str, object]:
    """The ``--json`` output line of one generation."""
    return {
        "prompt": prompt,
        "prompt_ids": list(result.prompt_ids),
        "text": result.text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "stats": result.stats.to_dict(),
    }


def summary_line(result: GenerationResult) -> str:
    """A one-line human summary of a generation's statistics."""
    s = result.stats
    fallback = (
        f", fell back to local after {s.fallback_at_token} tokens ({s.fallback_reason})" if s.fell_back_to_local else ""
    )
    trusted = f", {s.num_trusted} trusted by the gate" if s.mode_requested == "gated" else ""
    return (
        f"[{s.mode_used}] {s.num_generated} tokens in {s.wall_s:.2f} s, {s.num_target_passes} target passes, "
        f"accepted {s.num_accepted}/{s.num_drafted} drafts{trusted}, {s.mean_accepted_length:.2f} tokens/round, "
        f"{s.bytes_up_per_token:.0f} B up + {s.bytes_down_per_token:.0f} B down per token{fallback}"
    )


def generate_main(args: argparse.Namespace) -> int:
    """Generate completions for ``--prompt`` or each line of ``--prompts-file``."""
    try:
        config = config_from_args(args)
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        prompts = [args.prompt] if args.prompt is not None else list(read_prompts(args.prompts_file))
    except (ConfigError, ValueError, OSError) as error:
        print(f"tandem edge generate: {error}", file=sys.stderr)
        return 2
    if config.cloud is None and config.mode != "local":
        logger.warning("no --cloud given: decoding locally with the drafter alone")
    try:
        runtime = EdgeRuntime(config)
    except (BundleError, OSError, ValueError) as error:
        print(f"tandem edge generate: {error}", file=sys.stderr)
        return 1
    with runtime:
        for prompt in prompts:
            request = GenerationRequest(
                prompt_ids=runtime.tokenizer.encode_prompt(prompt),
                sampling=sampling,
                max_new_tokens=args.max_new_tokens,
                stop_strings=tuple(args.stop or ()),
            )
            try:
                result = runtime.decoder.generate(request)
            except CloudRefused as error:  # this request was refused: an error, never a silent local answer
                print(f"tandem edge generate: the verifier refused the request: {error}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(result_record(prompt, result)), flush=True)
            else:
                print(prompt + result.text)
                print(summary_line(result), file=sys.stderr, flush=True)
    return 0


def serve_main(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible local API until interrupted."""
    from tandemspec.edge.api import serve

    try:
        config: EdgeConfig = config_from_args(args)
        runtime = EdgeRuntime(config)
    except (ConfigError, BundleError, OSError, ValueError) as error:
        print(f"tandem edge serve: {error}", file=sys.stderr)
        return 1
    with runtime:
        serve(runtime, config.host, config.port)
    return 0
