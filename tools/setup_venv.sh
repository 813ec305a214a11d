#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at $MATPO_VENV (default: ./.venv) with the pinned CPU stack.
# Idempotent: a stamp holding the hash of the requirement files skips work when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MATPO_VENV:-$root/.venv}"
py="${MATPO_PYTHON:-}"
if [ -z "$py" ]; then
  for cand in /root/.pyenv/versions/3.12.1/bin/python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3.12" python3.12; do
    if command -v "$cand" >/dev/null 2>&1; then py="$(command -v "$cand")"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup_venv: Python 3.12 not found; set MATPO_PYTHON=/path/to/python3.12" >&2; exit 2; }

reqs=("$root/requirements/cpu.txt" "$root/requirements/cpu-lock.txt" "$root/setup.py")
stamp_val="$(for f in "${reqs[@]}"; do [ -f "$f" ] && cat "$f"; done | sha256sum | cut -d' ' -f1)"
stamp="$venv/.matpo-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_val" ]; then
  exit 0
fi
echo "setup_venv: installing the pinned stack into $venv (first time: ~3-5 min, ~11 GB)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q -U pip==25.3
lock=()
[ -f "$root/requirements/cpu-lock.txt" ] && lock=(-c "$root/requirements/cpu-lock.txt")
"${pip[@]}" install -q --no-compile "${lock[@]}" -r "$root/requirements/cpu.txt"
# megatron-bridge's declared deps (flashinfer/transformers pins) conflict with sglang's; it runs with what sglang brings.
"${pip[@]}" install -q --no-compile --no-deps megatron-bridge==0.6.2
# sgl-flash-mla raises OSError (not ImportError) on CPU-only hosts, which breaks megatron-core's spec imports.
"${pip[@]}" uninstall -q -y sgl-flash-mla 2>/dev/null || true
"${pip[@]}" install -q --no-compile --no-deps -e "$root"
# Byte-compile what we import: machines here set PYTHONDONTWRITEBYTECODE=1 and pip ran --no-compile,
# and without .pyc files each Megatron rank spends ~50 s (instead of ~20 s) importing megatron/bridge.
env -u PYTHONDONTWRITEBYTECODE "$venv/bin/python" -c "
from megatron_matpo import platform; platform.activate()
from megatron_matpo.compat import import_auto_bridge; import_auto_bridge()
import megatron.core.optimizer, megatron.core.dist_checkpointing, megatron.core.pipeline_parallel
import transformers, safetensors, tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer
" >/dev/null 2>&1 || { echo "setup_venv: import check failed; run the line above by hand to see why" >&2; exit 1; }
# The same for what SGLang engines (three processes each) and every Ray worker import but the check
# above does not: without .pyc files each engine start compiled sglang's ~4.7k modules again.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$venv/bin/python" -m compileall -q -j 0 "$site/sglang" "$site/ray" "$site/transformers" "$site/megatron" \
  >/dev/null 2>&1 || true  # a module that does not compile is one that is never imported
echo "$stamp_val" > "$stamp"
echo "setup_venv: done" >&2
