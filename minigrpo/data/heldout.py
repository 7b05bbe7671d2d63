"""Fixed held-out Countdown task sets, shipped as files with their SHA-256, so every result (a base
model, a warm-up, a GRPO checkpoint, TRL's) is measured on the same tasks, and none of them is ever
trained on: a recipe that names a set (`heldout: countdown-3x99`) has its tasks removed from its train
and test splits (`load_countdown(exclude=...)`), the warm-up's rows included.

    countdown-3x99   640 tasks of 3 numbers in 1..99, targets in 1..999 (the generator's seed 20261207;
                     the first 640 distinct tasks). A huge task space (no repeats), where the warm-up
                     of 2026-12-06 solved about 22% (43/191): headroom on both sides.

Rebuild a set's file (it must come out byte for byte the same): `python -m minigrpo.data.heldout NAME`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from minigrpo.data.generate import generate_countdown

FOLDER = Path(__file__).resolve().parent / "heldout"


@dataclasses.dataclass(frozen=True)
class HeldOutSet:
    size: int
    seed: int
    difficulty: dict  # the generator's min_numbers, max_numbers, max_number, max_target
    sha256: str  # of the file's bytes

    def path(self, name: str) -> Path:
        return FOLDER / f"{name}.jsonl"


HELDOUT_SETS = {
    "countdown-3x99": HeldOutSet(
        size=640, seed=20261207, difficulty={"min_numbers": 3, "max_numbers": 3, "max_number": 99, "max_target": 999},
        sha256="423b85beb99112688e14b23817f381b4ee901cde79ca4db09f0d1813de25fca8",
    ),
}


def task_key(nums, target) -> tuple:
    """What makes two tasks the same puzzle: the numbers as a multiset, and the target."""
    return tuple(sorted(int(n) for n in nums)), int(target)


def build_heldout(name: str) -> str:
    """The set's file contents: one `{"nums": [...], "target": t}` per line, the first `size` distinct
    tasks the generator makes with the set's seed and difficulty."""
    spec = HELDOUT_SETS[name]
    columns = generate_countdown(2 * spec.size, seed=spec.seed, **spec.difficulty)
    seen, lines = set(), []
    for nums, target in zip(columns["nums"], columns["target"]):
        key = task_key(nums, target)
        if key not in seen:
            seen.add(key)
            lines.append(json.dumps({"nums": list(nums), "target": int(target)}))
    if len(lines) < spec.size:
        raise ValueError(f"{name}: only {len(lines)} distinct tasks in {2 * spec.size} generated")
    return "\n".join(lines[:spec.size]) + "\n"


def load_heldout(name: str) -> list[dict]:
    """The set's tasks (`nums`, `target`), after checking the file's SHA-256 against the recorded one."""
    if name not in HELDOUT_SETS:
        raise ValueError(f"unknown held-out set {name!r}; known: {sorted(HELDOUT_SETS)}")
    spec = HELDOUT_SETS[name]
    data = spec.path(name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise ValueError(f"{spec.path(name)} has SHA-256 {digest}, not the recorded {spec.sha256}: "
                         "the held-out tasks changed, so results would not compare with earlier ones")
    return [json.loads(line) for line in data.decode().splitlines()]


def heldout_keys(name: str) -> set[tuple]:
    return {task_key(t["nums"], t["target"]) for t in load_heldout(name)}


if __name__ == "__main__":  # rebuild a set's file and print its hash
    name = sys.argv[1]
    text = build_heldout(name)
    HELDOUT_SETS[name].path(name).parent.mkdir(exist_ok=True)
    HELDOUT_SETS[name].path(name).write_text(text)
    print(f"{HELDOUT_SETS[name].path(name)}: {len(text.splitlines())} tasks, sha256 {hashlib.sha256(text.encode()).hexdigest()}")
