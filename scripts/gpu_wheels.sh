#!/usr/bin/env bash
# Wheels for `make test-gpu` on a stock PyTorch GPU image that has no network and no DeepSpeed.
# Run on any machine with the package registry (this CPU machine is fine); it writes wheels/gpu/
# (~6 MB, gitignored). Bring the folder with the repository to the GPU machine.
#
# DeepSpeed ships only as a source package: `pip wheel` builds its pure-Python wheel here (its ops
# are compiled on first use, and minigrpo uses none). Its small dependencies are downloaded as
# wheels for the GPU image's Python (3.12, x86-64 Linux). torch, numpy, packaging and tqdm are on
# the image already; vLLM (GBs) is not brought, so the vLLM GPU tests skip there with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
py_version="${GPU_PYTHON_VERSION:-3.12}"
out=wheels/gpu
mkdir -p "$out"
pip=("$python" -m pip --disable-pip-version-check -q)
"${pip[@]}" wheel --no-deps -w "$out" "deepspeed==0.19.8"
"${pip[@]}" download --only-binary=:all: --python-version "$py_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out" pydantic einops hjson msgpack ninja py-cpuinfo psutil
echo "[gpu-wheels] $(ls "$out" | wc -l) wheels in $out ($(du -sh "$out" | cut -f1))" >&2
