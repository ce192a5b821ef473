#!/usr/bin/env bash
# Reproducible NVIDIA Dynamo 1.6.1 environment for side-by-side benchmarks (CPU only).
#
# Creates bench/.work/dynamo-venv with ai-dynamo + ai-dynamo-runtime 1.6.1 installed
# --no-deps, then their runtime dependencies by hand (from the wheels' Requires-Dist):
#   - aisimulate==0.13.0 is not on the registry: skipped; the mocker's default polynomial
#     perf model does not need it (only --ais-perf-model does).
#   - certifi>=2026.10.19 is newer than any published certifi: the latest one is installed.
#   - GPU extras (vllm / sglang / trtllm) are not needed by dynamo.mocker / dynamo.frontend.
# Then prepares bench/.work/dynamo-model: the tokenizer/config files of the model that
# lightspeed.models.registry resolves (the packaged SmolLM2 GGUF), without the weights, with
# `architectures` added to config.json when absent (Dynamo's frontend refuses a config
# without it: "missing field `architectures`").
#
# Usage: bash bench/setup_dynamo.sh [--check]     (--check: start frontend + 2 mockers, send
#        one request, stop them)
# Env:   DYNAMO_VENV (venv path), LIGHTSPEED_PYTHON (python with the lightspeed deps).
set -euo pipefail

TAG=setup_dynamo
source "$(dirname "${BASH_SOURCE[0]}")/setup_common.sh"
VENV="${DYNAMO_VENV:-$WORK/dynamo-venv}"
MODEL_DIR="$WORK/dynamo-model"
DYNAMO_VERSION="1.6.1"

make_venv() {
  ensure_venv "$VENV"
  "$VENV/bin/pip" install -q --no-deps "ai-dynamo==$DYNAMO_VERSION" "ai-dynamo-runtime==$DYNAMO_VERSION"
  # ai-dynamo-runtime: pydantic, uvloop. ai-dynamo: the rest (aisimulate skipped, see above).
  "$VENV/bin/pip" install -q \
    "pydantic>=2.10.6,<=2.13.5" "uvloop>=0.21.0" \
    "aiohttp>=3.14.3,<4.0" certifi "kubernetes>=32.0.1,<33.0.0" "msgspec>=0.19.0" \
    "prometheus-client>=0.23.1,<1.0" "pyzmq>=26.0.0" "redis>=6.2.0,<9.0.0" "tqdm>=4.0.0" \
    "transformers>=4.56.0" "typing-extensions>=4.10.0" "zstandard>=0.23.0,<1.0"
  log "installed: $("$VENV/bin/pip" list 2>/dev/null | grep -E '^ai-dynamo' | tr -s ' ' | paste -sd ',')"
}

make_model_dir() {
  local src
  src="$("$LS_PY" -c 'from lightspeed.models.registry import resolve_model; print(resolve_model(None).folder)')"
  log "model folder from lightspeed.models.registry: $src"
  mkdir -p "$MODEL_DIR"
  for f in config.json tokenizer.json tokenizer_config.json generation_config.json; do
    [[ -f "$src/$f" ]] && cp "$src/$f" "$MODEL_DIR/$f"
  done
  "$VENV/bin/python" - "$MODEL_DIR/config.json" <<'EOF'
import json, sys
path = sys.argv[1]
cfg = json.load(open(path))
if not cfg.get("architectures"):
    cfg["architectures"] = ["LlamaForCausalLM"]
    json.dump(cfg, open(path, "w"), indent=2)
EOF
}

check() {
  local kv port=18471 fe mk
  kv="$(mktemp -d)"
  export DYN_FILE_KV="$kv" DYN_TCP_RPC_HOST=127.0.0.1 DYN_EVENT_PLANE_HOST=127.0.0.1 \
    DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1 DYN_SELF_HOST_METADATA=0
  local planes=(--discovery-backend file --request-plane tcp --event-plane zmq)
  "$VENV/bin/python" -m dynamo.frontend --http-host 127.0.0.1 --http-port "$port" "${planes[@]}" \
    >"$WORK/check-frontend.log" 2>&1 &
  fe=$!
  "$VENV/bin/python" -m dynamo.mocker --model-path "$MODEL_DIR" --model-name smollm2 \
    --num-workers 2 --speedup-ratio 100000 "${planes[@]}" >"$WORK/check-mocker.log" 2>&1 &
  mk=$!
  trap 'kill $fe $mk 2>/dev/null || true; wait $fe $mk 2>/dev/null || true; rm -rf "$kv"' RETURN
  check_server "$port" "$fe" "$WORK/check-frontend.log" "Dynamo frontend + 2 mockers"
}

make_venv
make_model_dir
if [[ "${1:-}" == "--check" ]]; then
  check
fi
log "done: venv $VENV, model folder $MODEL_DIR"
