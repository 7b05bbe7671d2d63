"""The learning benchmark against TRL compares like with like: TRL's side gets minigrpo's prompts in
minigrpo's order and every recipe setting it has a counterpart for, and a recipe with a setting TRL's
side would not get is refused. (The benchmark itself runs for an hour: benchmarks/learning_vs_trl.py.)"""

import json
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from minigrpo import Config
from minigrpo.batching import prompt_indices

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import learning_vs_trl  # noqa: E402
from vs_trl import in_minigrpo_order  # noqa: E402


def test_trl_reads_minigrpo_prompts_in_minigrpo_order_across_epochs(tokenizer):
    """5 tasks, 2 prompts per step, 4 steps: position k of TRL's unshuffled rows is the prompt
    minigrpo trains on at position k, the second epoch drawn from its own permutation (seed + 1)."""
    train = Dataset.from_dict({"nums": [[i, i + 1] for i in range(5)], "target": [10 + i for i in range(5)]})
    rows = in_minigrpo_order(train, tokenizer, prompts_per_step=2, steps=4, seed=3)
    expected = [i for s in range(4) for i in prompt_indices(2 * s, 5, 2, 3, 0, 1)]
    assert len(rows) == 8 and rows["target"] == [10 + i for i in expected]
    assert sorted(expected[:5]) == [0, 1, 2, 3, 4]  # the first epoch is a permutation of all 5 tasks
    assert len(set(expected[5:])) == 3  # the second epoch's first 3, from another permutation
    assert all(r["prompt"].rstrip().endswith("<think>") and str(r["target"]) in r["prompt"] for r in rows)


def test_trl_side_gets_every_matched_setting_of_the_recipe(tmp_path):
    """The recipe's settings reach GRPOConfig's arguments, under TRL's names and semantics."""
    import _trl_side

    cfg = Config.load(str(learning_vs_trl.RECIPE))
    learning_vs_trl.check_matched(cfg)  # the shipped recipe is comparable as it is
    s = learning_vs_trl.trl_settings(cfg, "START", tmp_path, steps=20, threads=2)
    kw = _trl_side.grpo_config_kwargs(s, use_vllm=True)
    assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"], kw["num_generations"]) == (4, 8, 8)
    assert (kw["learning_rate"], kw["lr_scheduler_type"], kw["warmup_steps"], kw["max_steps"]) == (2e-5, "constant", 0.0, 20)
    assert (kw["adam_beta1"], kw["adam_beta2"], kw["weight_decay"], kw["max_grad_norm"]) == (0.9, 0.99, 0.0, 1.0)
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["beta"], kw["epsilon"]) == (0.7, 1.0, 0, 0.0, 0.2)
    assert (kw["loss_type"], kw["scale_rewards"], kw["num_iterations"]) == ("grpo", "group", 1)
    assert kw["reward_weights"] == [0.0, 1.0, 1.0, 0.5, 2.0] and s["rewards"] == cfg.rewards
    assert (kw["save_steps"], kw["save_only_model"], kw["shuffle_dataset"], kw["seed"]) == (10, True, False, 42)
    assert kw["vllm_max_model_length"] == 256 + 128 and not kw["vllm_importance_sampling_correction"]
    trl = pytest.importorskip("trl")  # the pinned bench extra: TRL takes every argument, as given
    args = trl.GRPOConfig(**{**kw, "output_dir": str(tmp_path / "trl")})
    assert (args.adam_beta2, args.generation_batch_size, args.steps_per_generation) == (0.99, 32, 8)


@pytest.mark.parametrize("override, name", [("dynamic_sampling=true", "dynamic_sampling"),
                                            ("num_iterations=2", "num_iterations"),
                                            ("rollout_correction=token_truncate", "rollout_correction"),
                                            ("stop=[</answer>]", "stop"),
                                            ("loss_type=bnpo", "loss_type"),
                                            ("warmup_ratio=0.1", "warmup_ratio"),
                                            ("weight_decay=0.01", "weight_decay")])
def test_a_setting_trl_side_would_not_get_is_refused(override, name):
    cfg = Config.load(str(learning_vs_trl.RECIPE), [override])
    with pytest.raises(SystemExit, match=f"'{name}'"):
        learning_vs_trl.check_matched(cfg)


def _eval_file(path, solved, k=8, pass_k=None, kl=None):
    from minigrpo.evaluation import rate

    outcomes = {"success": solved, "format": [True] * len(solved), f"pass@{k}": pass_k}
    summary = {"success": rate(solved), **({f"pass@{k}": rate(pass_k)} if pass_k else {})}
    data = {"without_stop": {"summary": {"all": summary}, "outcomes": outcomes, "completion_length_mean": 50.0,
                             "think_arithmetic": {"steps_correct": 3, "steps_written": 4, "solved_sound": 0.5}}}
    if kl:
        data["kl_to"] = kl
    path.write_text(json.dumps(data))


def test_the_table_is_built_from_the_files_each_stage_left(tmp_path, capsys):
    """Hand-made stage files, 10 tasks: the start solves 2; minigrpo's end 6 (tasks 0-5), TRL's end 4
    (tasks 0-1, 6-7): gains +0.4 and +0.2, TRL's minus ours -0.2 (2 tasks only TRL solves, 4 only ours)."""
    out, n = tmp_path, 10
    solved = lambda idx: [i in idx for i in range(n)]  # noqa: E731
    _eval_file(out / "eval-start.json", solved({0, 1}))
    for side in ("minigrpo", "trl"):
        _eval_file(out / f"eval-mid-{side}.json", solved({0, 1, 2}))
    _eval_file(out / "eval-end-minigrpo.json", solved({0, 1, 2, 3, 4, 5}), pass_k=solved(set(range(8))),
               kl={"k1": 0.01, "k3": 0.02})
    _eval_file(out / "eval-end-trl.json", solved({0, 1, 6, 7}), pass_k=solved(set(range(7))), kl={"k1": 0.03, "k3": 0.04})
    (out / "minigrpo").mkdir()
    rows = [{"step": 0, "eval/tasks": 5.0}] + [{"step": s, "time/step": 10.0, "batch/completions": 32.0} for s in (1, 2, 3, 4)]
    (out / "minigrpo" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (out / "trl.json").write_text(json.dumps({"steps": [{"step": s, "seconds": 25.0} for s in (1, 2, 3, 4)]}))
    (out / "trl_settings.json").write_text(json.dumps({"prompts_per_step": 4, "num_generations": 8}))

    table = learning_vs_trl.report(out, steps=4, k=8)
    gap = table["paired"]["TRL gain - minigrpo gain, success"]
    assert (gap["difference"], gap["only_a"], gap["only_b"]) == (pytest.approx(-0.2), 4, 2)
    assert table["paired"]["minigrpo end - start, success"]["difference"] == pytest.approx(0.4)
    assert table["paired"]["TRL gain - minigrpo gain, pass@8"]["difference"] == pytest.approx(-0.1)
    assert table["paired"]["TRL - minigrpo, step 2, success"]["difference"] == 0.0  # both mid files alike
    assert table["step_seconds_total"] == {"minigrpo": 40.0, "trl": 100.0}
    assert table["audit"]["end-trl"]["kl_to_start"] == {"k1": 0.03, "k3": 0.04}
    printed = capsys.readouterr().out
    assert "TRL / minigrpo: 2.50x" in printed and "64/64" in printed and "3/4" in printed


def test_stage_files_of_another_run_are_refused(tmp_path):
    identity = {"steps": 20, "k": 8, "start": "/a", "recipe_sha256": "x"}
    learning_vs_trl.check_manifest(tmp_path, identity)  # the first run writes it
    learning_vs_trl.check_manifest(tmp_path, identity)  # the same run resumes
    with pytest.raises(SystemExit, match="other settings .*'steps': \\(20, 10\\)"):
        learning_vs_trl.check_manifest(tmp_path, {**identity, "steps": 10})


def test_stages_are_skipped_when_their_file_is_there_and_minigrpo_resumes(tmp_path, monkeypatch):
    """With `run` stubbed: an evaluation whose JSON exists is not run again; minigrpo's training runs
    with --resume once a checkpoint exists, and not at all once the last one does."""
    ran = []
    monkeypatch.setattr(learning_vs_trl, "run", lambda cmd, log, threads: ran.append(cmd))
    (tmp_path / "eval-start.json").write_text("{}")
    learning_vs_trl.evaluate(tmp_path / "m", tmp_path / "eval-start.json", 0, tmp_path, 2)
    learning_vs_trl.evaluate(tmp_path / "m", tmp_path / "eval-mid-trl.json", 0, tmp_path, 2,
                             compare=tmp_path / "eval-start.json", kl_to="/start")
    assert len(ran) == 1 and ran[0][-4:] == ["--compare", str(tmp_path / "eval-start.json"), "--kl-to", "/start"]

    ran.clear()
    learning_vs_trl.train_minigrpo("/start", tmp_path, 20, 2)  # nothing on disk: from the start
    (tmp_path / "minigrpo" / "checkpoints" / "step-000010").mkdir(parents=True)
    learning_vs_trl.train_minigrpo("/start", tmp_path, 20, 2)  # a checkpoint: resumed
    learning_vs_trl.checkpoint("minigrpo", tmp_path, 20).mkdir(parents=True)
    learning_vs_trl.train_minigrpo("/start", tmp_path, 20, 2)  # the last one: done
    assert ["--resume" in cmd for cmd in ran] == [False, True]
    assert "max_steps=20" in ran[0] and "save_steps=10" in ran[0] and "eval_num_samples=0" in ran[0]


def test_first_command_finds_the_phases_and_the_longest_silence():
    """benchmarks/first_command.py: phases from the start-up stages and the step bar, silences between lines."""
    from first_command import phases, silences

    lines = [(7.0, "[minigrpo] loading m and its DeepSpeed engine ..."), (7.4, "[minigrpo] loading m and its DeepSpeed engine ... 0 s done"),
             (7.5, "[minigrpo] starting the vLLM engine ..."), (12.5, "[minigrpo] starting the vLLM engine ... 5 s"),
             (50.0, "[minigrpo] starting the vLLM engine ... 42 s done"), (50.1, "[minigrpo] step 0: evaluating 100 held-out tasks ..."),
             (90.0, "[minigrpo] step 0, before training: held-out format 0.00"), (91.0, "grpo:   0%| 0/12"),
             (400.0, "grpo:  100%| 12/12, evaluating 100 held-out tasks (greedy)"), (410.0, "grpo: 100%| 12/12, reward=0.9"),
             (412.0, "<exit>")]
    assert phases(lines) == [("python start-up and imports", 7.0), ("loading m and its DeepSpeed engine", 0.5),
                             ("starting the vLLM engine", 42.6), ("step 0: evaluating 100 held-out tasks", 40.9),
                             ("training steps", 309.0), ("held-out evaluation after the last step", 10.0),
                             ("saving the checkpoint", 2.0)]
    assert silences(lines, 2) == [(309.0, 91.0, "grpo:   0%| 0/12"), (39.9, 50.1, "[minigrpo] step 0: evaluating 100 held-out tasks ...")]
