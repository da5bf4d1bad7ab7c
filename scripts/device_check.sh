#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run for a session that is lent a device machine.
#
# That machine has PyTorch, transformers, ONNX Runtime and grpcio but no network, and it
# takes at most 64 MiB of working tree per call. So:
#
#   here, once:   bash scripts/device_check.sh prepare
#                 (wheels the device image may lack or hold at other versions -> .whl/, git-ignored;
#                  and models/smollm2/ out of what travels: the tracked tree is ~77 MB, the checks
#                  need only the reference pair; `bash scripts/device_check.sh restore` undoes it)
#   there:        bash scripts/device_check.sh run      (carry .whl; about 8 minutes)
#
# What it measures, each stage under its own timeout so that one stuck stage loses nothing
# of the others, written to $OUT (at most 8 files come back):
#   env.txt        the GPU, driver and package versions
#   pass_cost.md   a target pass's time by tokens fed, CUDA bf16 and fp32: the reference target
#                  and a SmolLM2-135M-shaped one (random weights: time does not depend on them)
#   verifier.md    verified tokens/s against concurrent sessions, batching on and off
#   invariance.txt whether a pass over several tokens gives the logits of one-token steps on CUDA
#                  (bf16 with SDPA and eager attention, fp32), which lossless = cloud-only rests on
#   bench.md/.json `tandem bench` on the reference pair with the verifier on CUDA in float32
#                  (16-bit passes of different lengths give different logits, so exact match
#                  against cloud-only holds in float32 only; docs/benchmark.md)
#   log.txt        everything the stages printed
#
# A dry run here, on the CPU with small sizes: OUT=/tmp/out CHECK_DEVICE=cpu CHECK_QUICK=1 bash scripts/device_check.sh run
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DEVICE=${CHECK_DEVICE:-cuda}
if [[ -n ${CHECK_QUICK:-} ]]; then
  TOKENS=1,5 REPS=2 SESSIONS=1,4 ROUNDS=4 PROMPTS=2 NEW=16
else
  TOKENS=1,2,5,9,17,33 REPS=15 SESSIONS=1,4,16,64 ROUNDS=20 PROMPTS=16 NEW=48
fi
WHEELS=(protobuf==6.33.6 grpcio==1.85.3 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1
  transformers==5.24.0 huggingface_hub==2.4.0)

prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || exit 1
  grep -qx '/models/smollm2/' .git/info/exclude || echo '/models/smollm2/' >> .git/info/exclude
  git rm -r -q --cached models/smollm2
  du -ch .whl/*.whl | tail -1
  echo "models/smollm2 is out of the index until: bash scripts/device_check.sh restore"
}

restore() {
  git reset -q -- models/smollm2
  sed -i '\#^/models/smollm2/$#d' .git/info/exclude
  git status --short models/smollm2
}

stage() {  # stage NAME SECONDS COMMAND...: run one stage, say how it ended
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s)"
  timeout "$limit" "$@"
  echo "=== $name ended with $?"
}

run() {
  : "${OUT:?set OUT to the folder for the results}"
  exec > >(tee "$OUT/log.txt") 2>&1
  export PYTHONUNBUFFERED=1
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH"
  {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    python3 -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|onnxruntime|grpcio|protobuf|tokenizers|numpy) '
    nproc
  } > "$OUT/env.txt" 2>&1

  stage pass-cost 150 bash "$0" pass-cost > "$OUT/pass_cost.md"

  stage verifier 120 python3 scripts/bench_verifier.py --model models/reference/target --device "$DEVICE" \
    --dtype bfloat16 --sessions "$SESSIONS" --rounds "$ROUNDS" > "$OUT/verifier.md"

  stage invariance 150 bash "$0" invariance > "$OUT/invariance.txt"

  head -"$PROMPTS" tandemspec/bench/prompts.jsonl > /tmp/bench_prompts.jsonl
  stage bench 330 tandem bench --prompts /tmp/bench_prompts.jsonl --device "$DEVICE" --dtype float32 \
    --rtt-ms 0,20,80 --concurrency 1,16 --modes cloud,lossless-sync,lossless,lossless-nobranch,lossless-sync-auto,tree \
    --tree-budget 8,16 --max-new-tokens "$NEW" --out /tmp/bench
  cp /tmp/bench/results.md "$OUT/bench.md" 2>/dev/null
  cp /tmp/bench/results.json "$OUT/bench.json" 2>/dev/null
  echo "=== done $(date -u +%T)"
}

pass_cost() {  # the reference target and a SmolLM2-135M-shaped one, bf16 and fp32
  local smol=/tmp/smollm2-shape
  mkdir -p "$smol"
  cat > "$smol/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
 "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
 "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
JSON
  for dtype in bfloat16 float32; do
    python3 scripts/pass_cost.py --model models/reference/target --device "$DEVICE" --dtype "$dtype" \
      --tokens "$TOKENS" --reps "$REPS"
    python3 scripts/pass_cost.py --model "$smol" --random-weights --device "$DEVICE" --dtype "$dtype" \
      --tokens "$TOKENS" --reps "$REPS"
  done
}

invariance() {  # the reference target on the device: bf16 (SDPA, eager) and fp32
  for choice in "bfloat16 sdpa" "bfloat16 eager" "float32 auto"; do
    set -- $choice
    python3 scripts/pass_invariance.py --model models/reference/target --tokenizer models/reference/edge \
      --device "$DEVICE" --dtype "$1" --attn "$2" --prompts "$PROMPTS" --new-tokens "$NEW"
  done
}

case "${1:-}" in
  prepare) prepare ;;
  restore) restore ;;
  run) run ;;
  pass-cost) pass_cost ;;
  invariance) invariance ;;
  *) echo "usage: $0 prepare|restore|run|pass-cost|invariance" >&2; exit 2 ;;
esac
