# The README's two commands. Both create .venv and install minigrpo on first use (scripts/setup.sh
# is a no-op after that). On a GPU machine prefix them with MINIGRPO_TARGET=gpu.
.PHONY: countdown test setup test-gpu gpu-wheels

setup:
	bash scripts/setup.sh

# Countdown GRPO training with the default recipe (recipes/countdown_cpu.yaml).
countdown: setup
	.venv/bin/python examples/countdown.py $(ARGS)

# Every test, the slow ones (real model, vLLM engine, DeepSpeed) included; the 15 slowest are
# listed at the end, so growth shows when it happens (issue 25).
test: setup
	.venv/bin/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# On a GPU machine (a stock PyTorch image is enough): the tests marked `gpu`, then a table. Uses the
# machine's own python3 and torch, not .venv; DeepSpeed from wheels/gpu/ if missing (make gpu-wheels).
test-gpu:
	bash scripts/test_gpu.sh $(PYTEST_ARGS)

# On a machine with the package registry: wheels/gpu/ for test-gpu (DeepSpeed and its small deps).
gpu-wheels:
	bash scripts/gpu_wheels.sh
