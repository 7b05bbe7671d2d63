"""Countdown data: the generator (solvable, deterministic, fast), files, the hub path and its fallback."""

import json
import time

import datasets
import pandas as pd
import pytest

from minigrpo.data import countdown as countdown_module
from minigrpo.data import generate_countdown, load_countdown, read_countdown_file


def solvable(values: list[int], target: int) -> bool:
    """Brute force: can `values` (all of them, each once) reach `target` with + - * / and integer steps?

    Repeatedly replaces two values by a combination of them, which builds every binary expression tree.
    """
    if len(values) == 1:
        return values[0] == target
    for i in range(len(values)):
        for j in range(len(values)):
            if i == j:
                continue
            a, b = values[i], values[j]
            rest = [v for k, v in enumerate(values) if k not in (i, j)]
            results = [a + b, a * b] if i < j else []  # commutative ops once per pair
            results.append(a - b)
            if b != 0 and a % b == 0:
                results.append(a // b)
            if any(solvable(rest + [r], target) for r in results):
                return True
    return False


def test_solver_sanity():
    assert solvable([19, 36, 55, 7], 65)  # the seed's task: 55 + 36 - 7 - 19
    assert solvable([3, 3, 8], 72)  # 3 * 3 * 8
    assert solvable([2, 7], 14) and not solvable([2, 7], 15)
    assert not solvable([1, 1, 1], 100)


def test_every_generated_task_is_solvable_and_in_range():
    columns = generate_countdown(3000, seed=7)
    assert len(columns["nums"]) == len(columns["target"]) == 3000
    for nums, target in zip(columns["nums"], columns["target"]):
        assert 3 <= len(nums) <= 4 and all(type(n) is int and 1 <= n <= 99 for n in nums)
        assert type(target) is int and 1 <= target <= 999
        assert solvable(nums, target), (nums, target)
    sizes = [len(n) for n in columns["nums"]]
    assert 1200 < sizes.count(3) < 1800  # counts drawn uniformly from {3, 4}
    assert sum(t > 100 for t in columns["target"]) > 600  # not only small targets


def test_generator_options_and_errors():
    columns = generate_countdown(200, seed=1, min_numbers=2, max_numbers=2, max_number=9, max_target=50)
    for nums, target in zip(columns["nums"], columns["target"]):
        assert len(nums) == 2 and max(nums) <= 9 and 1 <= target <= 50 and solvable(nums, target)
    assert generate_countdown(0) == {"nums": [], "target": []}
    with pytest.raises(ValueError, match="min_numbers <= max_numbers"):
        generate_countdown(5, min_numbers=4, max_numbers=3)
    with pytest.raises(ValueError, match="<= 6"):
        generate_countdown(5, max_numbers=7)
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        generate_countdown(-1)


def test_generator_is_deterministic_per_seed_and_prefix_stable():
    a, b, c = generate_countdown(500, seed=3), generate_countdown(500, seed=3), generate_countdown(500, seed=4)
    assert a == b and a != c
    assert generate_countdown(100, seed=3) == {k: v[:100] for k, v in a.items()}


def test_generator_speed_100k():
    start = time.perf_counter()
    columns = generate_countdown(100_000, seed=0)
    elapsed = time.perf_counter() - start
    assert len(columns["target"]) == 100_000
    assert elapsed < 3.0, f"{elapsed:.2f} s for 100k tasks"  # ~0.2 s on the 2-core dev machine


def test_load_generated_split_is_deterministic():
    d1 = load_countdown("generate", num_samples=1000, seed=5)
    d2 = load_countdown("generate", num_samples=1000, seed=5)
    d3 = load_countdown("generate", num_samples=1000, seed=6)
    assert (len(d1["train"]), len(d1["test"])) == (900, 100)
    assert d1["train"].to_dict() == d2["train"].to_dict() and d1["test"].to_dict() == d2["test"].to_dict()
    assert d1["test"].to_dict() != d3["test"].to_dict()
    assert d1["train"].features["nums"] == datasets.Sequence(datasets.Value("int64"))
    assert d1["train"].features["target"] == datasets.Value("int64")


def test_load_generated_takes_the_difficulty_and_refuses_it_for_data_sources(tmp_path):
    easy = {"min_numbers": 2, "max_numbers": 3, "max_number": 20, "max_target": 100}
    d = load_countdown("generate", num_samples=400, seed=3, difficulty=easy)
    rows = d["train"].to_list() + d["test"].to_list()
    assert {len(r["nums"]) for r in rows} == {2, 3}
    assert max(max(r["nums"]) for r in rows) <= 20 and all(1 <= r["target"] <= 100 for r in rows)
    # the defaults are the generator's own: passing them changes nothing, for any source
    default = {"min_numbers": 3, "max_numbers": 4, "max_number": 99, "max_target": 999}
    assert load_countdown("generate", num_samples=50, seed=3, difficulty=default)["test"].to_dict() == \
        load_countdown("generate", num_samples=50, seed=3)["test"].to_dict()
    _frame().to_parquet(tmp_path / "t.parquet")
    assert len(load_countdown(tmp_path / "t.parquet", difficulty=default)["train"]) == 45
    with pytest.raises(ValueError, match="applies to the generator"):
        load_countdown(tmp_path / "t.parquet", difficulty=easy)


def test_fallback_to_generator_when_hub_unreachable(monkeypatch):
    def offline(name):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(countdown_module, "_from_hub", offline)
    with pytest.warns(UserWarning, match="using the built-in Countdown generator"):
        d = load_countdown(num_samples=200, seed=1)
    assert d["train"].to_dict() == load_countdown("generate", num_samples=200, seed=1)["train"].to_dict()


def test_explicit_hub_name_does_not_fall_back(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError):
        load_countdown("Jiayi-Pan/Countdown-Tasks-3to4")


def _frame(n=50, seed=2):
    columns = generate_countdown(n, seed=seed)
    return pd.DataFrame({"target": columns["target"], "nums": columns["nums"], "id": range(n)})


def test_parquet_and_jsonl_round_trip(tmp_path):
    frame = _frame()
    frame.to_parquet(tmp_path / "tasks.parquet")
    frame.to_json(tmp_path / "tasks.jsonl", orient="records", lines=True)
    for name in ("tasks.parquet", "tasks.jsonl"):
        rows = read_countdown_file(tmp_path / name)
        assert list(rows["nums"]) == frame["nums"].tolist() and list(rows["target"]) == frame["target"].tolist()
        assert list(rows["id"]) == list(range(50))  # extra columns are kept
        split = load_countdown(tmp_path / name, test_size=0.2, seed=0)
        assert (len(split["train"]), len(split["test"])) == (40, 10)
        assert sorted(list(split["train"]["id"]) + list(split["test"]["id"])) == list(range(50))


def test_local_folder_goes_through_load_dataset(tmp_path):
    """The hub code path (`datasets.load_dataset(name)`) also reads a local folder in hub layout."""
    (tmp_path / "data").mkdir()
    _frame(20).to_parquet(tmp_path / "data" / "train.parquet")
    d = load_countdown(str(tmp_path), test_size=5, seed=0)
    assert (len(d["train"]), len(d["test"])) == (15, 5)


def test_csv_nums_are_parsed_as_json_never_evaluated(tmp_path):
    path = tmp_path / "tasks.csv"
    path.write_text('target,nums\n65,"[19, 36, 55, 7]"\n24,"[2 ,3, 4]"\n')
    rows = read_countdown_file(path)
    assert rows.to_dict() == {"target": [65, 24], "nums": [[19, 36, 55, 7], [2, 3, 4]]}

    bad = tmp_path / "bad.csv"
    bad.write_text("target,nums\n1,[1]\n2,\"__import__('os').getcwd()\"\n")
    with pytest.raises(ValueError, match=r"bad.csv: row 1 nums .* is not a JSON list"):
        read_countdown_file(bad)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"target": 1}], r"missing column\(s\) \['nums'\]"),
        ([{"target": 1, "nums": []}], "row 0 nums must be a non-empty list"),
        ([{"target": 1, "nums": [1.5]}], "row 0 nums must be an integer, got float 1.5"),
        ([{"target": "1", "nums": [1]}, {"target": "six", "nums": [1]}], "row 1 target must be an integer"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=message):
        read_countdown_file(path)


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_countdown(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="only 50 rows"):
        _frame().to_parquet(tmp_path / "t.parquet")
        load_countdown(tmp_path / "t.parquet", num_samples=51)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        load_countdown("generate", num_samples=0)


# ------------------------------------------------------------------ the fixed held-out sets (issue 22)
def test_the_heldout_set_is_the_recorded_file_and_rebuilds_byte_for_byte():
    from minigrpo.data.heldout import HELDOUT_SETS, build_heldout, load_heldout, task_key

    spec = HELDOUT_SETS["countdown-3x99"]
    tasks = load_heldout("countdown-3x99")  # checks the SHA-256
    assert len(tasks) == spec.size == 640
    assert len({task_key(t["nums"], t["target"]) for t in tasks}) == 640  # distinct puzzles
    assert all(len(t["nums"]) == 3 and all(1 <= n <= 99 for n in t["nums"]) and 1 <= t["target"] <= 999 for t in tasks)
    assert all(solvable(t["nums"], t["target"]) for t in tasks[:50])
    assert build_heldout("countdown-3x99") == spec.path("countdown-3x99").read_text()


def test_a_changed_heldout_file_is_refused(tmp_path, monkeypatch):
    from minigrpo.data import heldout

    original = heldout.HELDOUT_SETS["countdown-3x99"].path("countdown-3x99").read_text()
    (tmp_path / "countdown-3x99.jsonl").write_text(original.replace('"target": 30}', '"target": 31}', 1))
    monkeypatch.setattr(heldout, "FOLDER", tmp_path)
    with pytest.raises(ValueError, match="SHA-256 .* not the recorded"):
        heldout.load_heldout("countdown-3x99")
    with pytest.raises(ValueError, match="unknown held-out set"):
        heldout.load_heldout("countdown-9x9")


def test_load_countdown_drops_excluded_tasks_from_both_splits_and_keeps_the_rest_in_place():
    from minigrpo.data.heldout import task_key

    plain = load_countdown("generate", num_samples=200, test_size=0.1, seed=3)
    drop = [plain["train"][0], plain["train"][7], plain["test"][1]]
    keys = {task_key(r["nums"][::-1], r["target"]) for r in drop}  # a multiset: order does not matter
    split = load_countdown("generate", num_samples=200, test_size=0.1, seed=3, exclude=keys)
    for name in ("train", "test"):
        want = [r for r in plain[name] if task_key(r["nums"], r["target"]) not in keys]
        assert list(split[name]) == want
    assert len(split["train"]) == len(plain["train"]) - 2 and len(split["test"]) == len(plain["test"]) - 1


def test_a_recipe_naming_a_heldout_set_never_trains_or_tests_on_it():
    """The held-out file is the first 640 distinct tasks of the generator's seed 20261207 at 3 numbers
    in 1..99: a recipe generating 1,280 tasks with that seed and tier holds every one of them, and
    load_recipe_tasks removes them all."""
    from minigrpo import Config, ConfigError
    from minigrpo.data import load_recipe_tasks
    from minigrpo.data.heldout import heldout_keys, task_key

    tier = dict(dataset="generate", dataset_size=1280, seed=20261207, generator_min_numbers=3,
                generator_max_numbers=3, generator_max_number=99, generator_max_target=999)
    keys = heldout_keys("countdown-3x99")
    rows = lambda s: [task_key(r["nums"], r["target"]) for name in ("train", "test") for r in s[name]]  # noqa: E731
    assert len(keys & set(rows(load_recipe_tasks(Config(**tier))))) == 640
    kept = rows(load_recipe_tasks(Config(**tier, heldout="countdown-3x99")))
    assert not keys & set(kept) and len(kept) >= 600  # the other 640, less the test split's repeats
    with pytest.raises(ConfigError, match="heldout"):
        Config(heldout="countdown-9x9")
