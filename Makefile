# The README's two commands. Both create .venv and install minigrpo on first use (scripts/setup.sh
# is a no-op after that). On a GPU machine prefix them with MINIGRPO_TARGET=gpu.
.PHONY: countdown test setup

setup:
	bash scripts/setup.sh

# Countdown GRPO training with the default recipe (recipes/countdown_cpu.yaml).
countdown: setup
	.venv/bin/python examples/countdown.py $(ARGS)

# Every test, the slow ones (real model, vLLM engine, DeepSpeed) included.
test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
