"""The optional supervised warm-up before GRPO (minigrpo/warmup.py): fine-tune the recipe's model on
the generator's known solutions, then train GRPO from the result.

    python examples/countdown_warmup.py                                   # recipes/countdown_cpu_warmup.yaml
    python examples/countdown_warmup.py --config my_warmup.yaml steps=60
    python examples/countdown.py --config recipes/countdown_cpu_learn.yaml \\
        --model outputs/countdown-warmup/model --output-dir outputs/countdown-learn-warm

Any warm-up key can be overridden as key=value (see minigrpo/warmup.py: WarmupConfig).
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in countdown.py: idle OpenMP threads must not spin

from minigrpo.warmup import WarmupConfig, warmup  # noqa: E402

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "countdown_cpu_warmup.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="YAML warm-up recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    wcfg = WarmupConfig.load(args.config, args.overrides)  # checked before any model loads
    folder = warmup(wcfg)
    print(f"[minigrpo] warm-up done: {folder} (train GRPO from it with --model {folder})")


if __name__ == "__main__":
    main()
