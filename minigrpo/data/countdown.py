"""Loading Countdown tasks (columns `nums`: list of ints, `target`: int) as a train/test `DatasetDict`.

Three sources, one result:
- the Hugging Face dataset `Jiayi-Pan/Countdown-Tasks-3to4` (or any hub name), through
  `datasets.load_dataset`: needs the network or a local hub cache;
- a local file, `.parquet`, `.jsonl`/`.json` (JSON Lines) or `.csv` (where `nums` is a string like
  "[1, 2, 3]", read with `json.loads`, never `eval`);
- the built-in offline generator (`generate.py`), `source="generate"`.

`source=None` means "the hub, else the generator": when the hub cannot be reached the generator is
used and a warning says so. Reaching the hub fails only after huggingface_hub's retries (~20 s);
set `HF_HUB_OFFLINE=1` to skip straight to the generator.

Like the Mini-R1 post: shuffle with the seed, keep `num_samples` rows (it took 50,000), and split
off `test_size` (10%) as the test set, deterministically for a seed.
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from pathlib import Path

import datasets
import pyarrow.csv as pcsv
import pyarrow.json as pj
import pyarrow.parquet as pq

from minigrpo.data.generate import generate_countdown
from minigrpo.data.heldout import heldout_keys, task_key

HUB_DATASET = "Jiayi-Pan/Countdown-Tasks-3to4"
GENERATED_SIZE = 50_000  # tasks the generator makes when num_samples is None (the post's subset size)
_FILE_READERS = {
    ".parquet": pq.read_table, ".jsonl": pj.read_json, ".json": pj.read_json, ".csv": pcsv.read_csv,
}
GENERATOR_NAMES = ("generate", "generator")
_GENERATOR_DEFAULTS = {k: p.default for k, p in inspect.signature(generate_countdown).parameters.items()
                       if p.kind is p.KEYWORD_ONLY and k not in ("seed", "solutions")}
_INT_TEXT = re.compile(r"\s*-?[0-9]+\s*")  # ASCII digits only


def load_countdown(
    source: str | Path | None = None,
    *,
    num_samples: int | None = None,
    test_size: float | int = 0.1,
    seed: int = 42,
    difficulty: dict | None = None,
    solutions: bool = False,
    exclude: set[tuple] | None = None,
) -> datasets.DatasetDict:
    """Countdown tasks as `DatasetDict({"train": ..., "test": ...})` with int `target` and list-of-int `nums`.

    Args:
        source: None (hub, else generator, with a warning), "generate", a hub dataset name (or a
            local folder in hub layout), or a path to a .parquet/.jsonl/.json/.csv file. Extra
            columns of a file or hub dataset are kept.
        num_samples: keep this many rows after shuffling with `seed` (None: all rows; the generator
            then makes `GENERATED_SIZE`). More rows than the source has is an error.
        test_size: fraction (float in (0, 1)) or number (int) of the kept rows that form "test".
            Tasks of "test" that also occur in "train" (or earlier in "test") are then dropped,
            so held-out means unseen; "test" can come out smaller on small tiers (`_unseen_test`).
        seed: seeds the shuffle, the split, and the generator.
        difficulty: the generator's `min_numbers`, `max_numbers`, `max_number`, `max_target`
            (`generate_countdown`; `Config.generator_difficulty()`). Values other than the
            generator's defaults are refused for other sources (a hub or file tier is its data).
        solutions: the generator's known answers as columns `steps` and `equation`
            (`generate_countdown`), for a supervised warm-up; the same tasks and split as without.
        exclude: task keys (`heldout.task_key`: the numbers as a multiset, and the target) to drop
            from both splits after splitting: a held-out set's tasks (`heldout.heldout_keys`), which no
            train or test split may contain. The other rows keep their places.

    Raises:
        FileNotFoundError: a path that does not exist.  ValueError: bad rows or arguments (naming the row).
        ConnectionError: a hub name given explicitly that cannot be reached.
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    difficulty = difficulty or {}
    if str(source) not in GENERATOR_NAMES and any(v != _GENERATOR_DEFAULTS[k] for k, v in difficulty.items()):
        raise ValueError(f"difficulty {difficulty} applies to the generator (source='generate'), not to {source!r}")
    if solutions and str(source) not in GENERATOR_NAMES:
        raise ValueError(f"solutions=True needs the generator (source='generate'): {source!r} has no known answers")
    if source is None:
        try:
            dataset = _from_hub(HUB_DATASET)
        except OSError as e:  # ConnectionError and friends: no network and no cached copy
            warnings.warn(
                f"could not load {HUB_DATASET} from the Hugging Face hub ({e}); using the built-in "
                f"Countdown generator instead (seed={seed})",
                stacklevel=2,
            )
            dataset = _generated(num_samples, seed, difficulty)
    elif str(source) in GENERATOR_NAMES:
        dataset = _generated(num_samples, seed, difficulty, solutions)
    elif Path(source).suffix.lower() in _FILE_READERS or Path(source).is_file():
        dataset = read_countdown_file(source)
    else:  # a hub name, or a local folder laid out like a hub dataset: load_dataset reads both
        dataset = _from_hub(str(source))

    if num_samples is not None:
        if num_samples > len(dataset):
            raise ValueError(f"num_samples={num_samples} but the source has only {len(dataset)} rows")
        dataset = dataset.shuffle(seed=seed).select(range(num_samples))
    split = _unseen_test(dataset.train_test_split(test_size=test_size, seed=seed))
    if exclude:
        for name in split:
            keep = [i for i, (ns, t) in enumerate(zip(split[name]["nums"], split[name]["target"]))
                    if task_key(ns, t) not in exclude]
            if len(keep) < len(split[name]):
                split[name] = split[name].select(keep)
    return split


def load_recipe_tasks(cfg, solutions: bool = False) -> datasets.DatasetDict:
    """The train/test splits a recipe (a `minigrpo.Config`) names: its dataset, size, split, seed and
    generator difficulty, without the tasks of its held-out set (`cfg.heldout`)."""
    exclude = heldout_keys(cfg.heldout) if cfg.heldout else None
    return load_countdown(cfg.dataset, num_samples=cfg.dataset_size, test_size=cfg.test_size, seed=cfg.seed,
                          difficulty=cfg.generator_difficulty(), solutions=solutions, exclude=exclude)


def _unseen_test(split: datasets.DatasetDict) -> datasets.DatasetDict:
    """Drop from "test" every task that also occurs in "train", and repeats within "test": the same
    numbers (as a multiset: order does not make another puzzle) with the same target. Small tiers
    repeat themselves (2-3 numbers in 1..20, targets <= 100: a third of a 5% split also occurred in
    train, measured for issue 13); the default tier (3-4 numbers in 1..99) almost never does."""
    seen = {task_key(ns, t) for ns, t in zip(split["train"]["nums"], split["train"]["target"])}
    keep = []
    for i, (ns, t) in enumerate(zip(split["test"]["nums"], split["test"]["target"])):
        key = task_key(ns, t)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(split["test"]):
        split["test"] = split["test"].select(keep)
    return split


def read_countdown_file(path: str | Path) -> datasets.Dataset:
    """Rows of a .parquet, .jsonl/.json (JSON Lines) or .csv file, with `nums` and `target` checked and typed.

    Read with pyarrow into memory (no cache written under ~/.cache): even the 490k-row hub
    dataset is ~20 MB. Malformed files raise pyarrow's ArrowInvalid (a ValueError) with the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Countdown file at {path}")
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FILE_READERS)}")
    return normalize_countdown(datasets.Dataset(reader(path)), origin=str(path))


def normalize_countdown(dataset: datasets.Dataset, origin: str = "dataset") -> datasets.Dataset:
    """Check every row has `nums` (a non-empty list of ints, or its JSON text) and an integer `target`; type them.

    Integer-typed columns (Parquet, the hub) are only cast to int64; text or untyped columns (CSV,
    JSON) are checked row by row. Raises ValueError naming the first bad row and `origin`.
    """
    missing = {"nums", "target"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{origin}: missing column(s) {sorted(missing)}; has {dataset.column_names}")
    features = dataset.features.copy()
    features["nums"] = datasets.Sequence(datasets.Value("int64"))
    features["target"] = datasets.Value("int64")
    if _is_int(getattr(dataset.features["nums"], "feature", None)) and _is_int(dataset.features["target"]):
        return dataset.cast(features) if dataset.features != features else dataset  # typed already: no row loop
    nums = [_parse_nums(v, i, origin) for i, v in enumerate(dataset["nums"])]
    targets = [_parse_int(v, f"{origin}: row {i} target") for i, v in enumerate(dataset["target"])]
    columns = dataset.to_dict()
    columns.update(nums=nums, target=targets)
    return datasets.Dataset.from_dict(columns, features=features)


def _generated(num_samples: int | None, seed: int, difficulty: dict, solutions: bool = False) -> datasets.Dataset:
    columns = generate_countdown(GENERATED_SIZE if num_samples is None else num_samples, seed=seed,
                                 solutions=solutions, **difficulty)
    features = {"target": datasets.Value("int64"), "nums": datasets.Sequence(datasets.Value("int64"))}
    if solutions:
        features.update(steps=datasets.Sequence(datasets.Value("string")), equation=datasets.Value("string"))
    return datasets.Dataset.from_dict({k: columns[k] for k in features}, features=datasets.Features(features))


def _from_hub(name: str) -> datasets.Dataset:
    # The hub copy is typed (target int64, nums list of int64), so this only checks the columns.
    return normalize_countdown(datasets.load_dataset(name, split="train"), origin=name)


def _parse_nums(value, row: int, origin: str) -> list[int]:
    if isinstance(value, str):  # CSV: "[1, 2, 3]"
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{origin}: row {row} nums {value!r} is not a JSON list") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{origin}: row {row} nums must be a non-empty list of integers, got {value!r}")
    return [_parse_int(v, f"{origin}: row {row} nums") for v in value]


def _is_int(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


def _parse_int(value, where: str) -> int:
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
    return value
