# The README's two commands. Both create .venv and install minigrpo on first use (scripts/setup.sh
# is a no-op after that). On a GPU machine prefix them with MINIGRPO_TARGET=gpu.
.PHONY: countdown test test-quick setup test-gpu gpu-wheels

setup:
	bash scripts/setup.sh

# Countdown GRPO training with the default recipe (recipes/countdown_cpu.yaml).
countdown: setup
	.venv/bin/python examples/countdown.py $(ARGS)

# Every test, the slow ones (real model, vLLM engine, DeepSpeed) included, on TEST_WORKERS pytest
# processes (pytest-xdist; each test still runs whole in one of them): alone, the suite kept ~1.2 of
# this machine's 2 cores busy, waiting on process start-ups, servers and deadlines; 2 workers 1.64,
# 3 workers 1.70 (docs/performance.md). The 15 slowest tests are listed at the end, so growth shows
# when it happens (issue 25).
TEST_WORKERS ?= 3
test: setup
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# The edit loop (~30 s here): the tests that load no real model, start no engine and launch no
# program (markers slow and process left out); conftest.py fails a test here that tries.
test-quick: setup
	MINIGRPO_TEST_QUICK=1 .venv/bin/python -m pytest -q -m "not slow and not process and not gpu" --durations=5 $(PYTEST_ARGS)

# On a GPU machine (a stock PyTorch image is enough): the tests marked `gpu`, then a table. Uses the
# machine's own python3 and torch, not .venv; DeepSpeed from wheels/gpu/ if missing (make gpu-wheels).
test-gpu:
	bash scripts/test_gpu.sh $(PYTEST_ARGS)

# On a machine with the package registry: wheels/gpu/ for test-gpu (DeepSpeed and its small deps).
gpu-wheels:
	bash scripts/gpu_wheels.sh
