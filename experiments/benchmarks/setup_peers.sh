#!/usr/bin/env bash
# Create the peer virtualenvs of the influence benchmarks under .peers/ (git-ignored), one per peer:
#   .peers/torch        torch 2.13 (CPU wheel) + numpy            -> plain torch.func runner
#   .peers/pydvl        torch 2.13 + pyDVL 0.10 [influence]       -> pyDVL pins numpy<2
#   .peers/kronfluence  torch 2.13 + kronfluence 1.0.1 --no-deps  -> its runtime deps by hand,
#                       without torchvision (kronfluence never imports it; no CPU build exists here)
# Idempotent: a venv whose marker file records the same install steps (written only after its
# packages imported at the pinned versions) is left alone; --force rebuilds every venv.
# Usage: bash experiments/benchmarks/setup_peers.sh [--force]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="${PEERS_DIR:-$ROOT/.peers}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"   # pip resolves this to the local CPU wheel; never a CUDA build
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1
mkdir -p "$PEERS"
T_ALL=$SECONDS

# make_venv NAME CHECK_PY -- pip install steps (one argument string per step)
make_venv() {
  local name="$1" check="$2"; shift 2
  local venv="$PEERS/$name" t0=$SECONDS
  local want="$TORCH_SPEC | $*"
  if [[ $FORCE == 0 && -x "$venv/bin/python" && -f "$venv/.installed" && "$(cat "$venv/.installed")" == "$want" ]]; then
    echo "[$name] up to date ($venv/.installed)"
    return
  fi
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1
  local step
  for step in "$@"; do
    echo "[$name] pip install $step"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q $step 2>&1 | { grep -v "^WARNING: Location" || true; }
    [[ ${PIPESTATUS[0]} == 0 ]] || { echo "[$name] pip install failed" >&2; exit 1; }
  done
  local got
  got="$("$venv/bin/python" -c "$check" 2>/dev/null)" || { echo "[$name] import check failed" >&2; exit 1; }
  echo "$want" > "$venv/.installed"
  echo "[$name] installed in $((SECONDS - t0)) s: $got"
}

# torch first in every venv, so that later 'torch>=X' requirements are already satisfied.
make_venv torch \
  "import torch, numpy; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('torch', torch.__version__, 'numpy', numpy.__version__)" \
  "$TORCH_SPEC numpy"

make_venv pydvl \
  "import torch, numpy, pydvl; from pydvl.influence.torch import DirectInfluence, CgInfluence, ArnoldiInfluence; assert pydvl.__version__ == '0.10.0'; print('pydvl', pydvl.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)" \
  "$TORCH_SPEC numpy<2" \
  "pydvl[influence]==0.10.0 $TORCH_SPEC numpy<2"

make_venv kronfluence \
  "import torch, numpy, kronfluence; from kronfluence.analyzer import Analyzer; print('kronfluence', kronfluence.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)" \
  "$TORCH_SPEC numpy" \
  "--no-deps kronfluence==1.0.1" \
  "accelerate>=0.31.0 einops>=0.8.0 einconv>=0.1.0 opt-einsum>=3.3.0 safetensors>=0.4.2 tqdm>=4.66.4 scikit-learn $TORCH_SPEC"

echo "peers ready in $PEERS ($((SECONDS - T_ALL)) s)"
