# Shared by bench/setup_*.sh (sourced, not run): paths, a venv, and the one-request check.
# The sourcing script sets TAG (its log prefix) before sourcing.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$ROOT/bench/.work"
LS_PY="${LIGHTSPEED_PYTHON:-$ROOT/.venv/bin/python}"

log() { echo "[${TAG:-setup}] $*" >&2; }

# ensure_venv VENV: a Python 3.11 venv at VENV (kept if it already exists).
ensure_venv() {
  mkdir -p "$WORK"
  if [[ ! -x "$1/bin/python" ]]; then
    log "creating venv $1"
    "${PYTHON:-python3.11}" -m venv "$1"
  fi
}

# check_server PORT PID LOG WHAT: wait (up to 300 s) until the OpenAI server on PORT lists the
# model "smollm2", then send one streamed completion and require its [DONE]. PID is the server
# process (its early exit fails the check), LOG its output file, WHAT names it in messages.
check_server() {
  local port="$1" pid="$2" logfile="$3" what="$4"
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/v1/models" | grep -q smollm2 && break
    kill -0 "$pid" 2>/dev/null || { log "$what exited; see $logfile"; return 1; }
    sleep 1
  done
  curl -sfN "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
    -d '{"model":"smollm2","prompt":[1000,1001,1002],"max_tokens":4,"stream":true,"ignore_eos":true}' \
    | grep -q '\[DONE\]' && log "check passed: $what answers" || {
      log "check FAILED; see $logfile"; return 1; }
}
