#!/usr/bin/env bash
# Rehearse `make test-gpu` on this CPU machine, in the GPU machine's software: a throwaway Python 3.12
# environment with the package set the lent GPU machine has (.library device notes, 2026-11: Python
# 3.12, torch 2.11.0 as its CUDA 13 build, transformers 5.17.0, accelerate, safetensors, peft,
# tensorboard, matplotlib, pytest; nothing of ours), DeepSpeed from wheels/gpu/ as `make gpu-wheels`
# makes it, then scripts/test_gpu.sh exactly as on the GPU. It checks that DeepSpeed installs from the
# wheels, pytest starts, every GPU test is collected and skips for lack of CUDA (with that reason), and
# nothing fails to import. Not part of `make test` (it downloads ~4 GB the first time).
#
#   bash scripts/rehearse_gpu.sh            # REHEARSAL_DIR (default /tmp/minigrpo-gpu-rehearsal) is rebuilt
set -euo pipefail
cd "$(dirname "$0")/.."
# the first Python 3.12 that runs: $PYTHON312, python3.12 on PATH (a pyenv shim may not), pyenv's builds
py312=""
for candidate in "${PYTHON312:-}" "$(command -v python3.12 2>/dev/null)" "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        py312="$candidate"; break
    fi
done
[ -n "$py312" ] || { echo "[rehearse] needs a Python 3.12 interpreter (PYTHON312=...)" >&2; exit 2; }
dir="${REHEARSAL_DIR:-/tmp/minigrpo-gpu-rehearsal}"
rm -rf "$dir"
"$py312" -m venv "$dir"
py="$dir/bin/python"
echo "[rehearse] $($py --version) in $dir: installing the GPU machine's packages" >&2
"$py" -m pip install --disable-pip-version-check -q --no-cache-dir "torch==2.11.0" "transformers==5.17.0" \
    accelerate safetensors peft tensorboard matplotlib pytest
[ -d wheels/gpu ] || bash scripts/gpu_wheels.sh
if "$py" -c "import deepspeed" 2>/dev/null; then
    echo "[rehearse] DeepSpeed is already there: the wheels would not be exercised" >&2; exit 1
fi
collected=$(cd "$PWD" && PYTHONPATH="$PWD:$PWD/tests" "$py" -m pytest tests/test_gpu.py -m gpu --collect-only -q \
    -p no:cacheprovider 2>/dev/null | grep -c "::" || true)
log="$dir/test_gpu.log"
set +e
PYTHON="$py" bash scripts/test_gpu.sh 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
"$py" -c "import deepspeed; print('[rehearse] deepspeed', deepspeed.__version__, 'installed from wheels/gpu')"
# the table's rows (test_gpu.sh): every collected test must be there, skipped, and none failed
skipped=$(grep -cE "^test_\S+ +skipped " "$log" || true)
bad=$(grep -cE "^test_\S+ +(FAILED|ERROR|passed) |ImportError|ModuleNotFoundError" "$log" || true)
echo "[rehearse] test_gpu.sh exit $rc; $collected GPU tests collected, $skipped skipped, $bad passed, failed or failed to import"
echo "[rehearse] why they skip (a reason other than CUDA or the GPU count applies on the GPU machine too):"
grep -E "^test_\S+ +skipped " "$log" | sed -E 's/^test_\S+ +skipped +[0-9.]+ +//' | sort | uniq -c | sed 's/^/[rehearse]   /'
[ "$rc" -eq 0 ] && [ "$collected" -gt 0 ] && [ "$skipped" -eq "$collected" ] && [ "$bad" -eq 0 ] \
    && echo "[rehearse] passed" || { echo "[rehearse] FAILED" >&2; exit 1; }
