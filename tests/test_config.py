"""Config: every mistake is an error naming the key, before any model loads."""

import pytest

from minigrpo.config import Config, ConfigError


def test_defaults_validate_and_layout():
    cfg = Config()
    lay = cfg.layout(1)
    # 2 prompts x 8 generations = 16 completions, 2 accumulation steps -> micro-batches of 8
    assert (lay.prompts_per_rank, lay.completions_per_rank, lay.micro_batch) == (2, 16, 8)


def test_seed_recipe_batch_meaning():
    # the seed: 3 ranks, 24 prompts x 8 generations = 192 completions per step;
    # per rank 8 prompts = 64 completions, 8 accumulation steps -> micro-batches of 8
    cfg = Config.from_dict({"prompts_per_step": 24, "num_generations": 8, "gradient_accumulation_steps": 8})
    lay = cfg.layout(3)
    assert (lay.prompts_per_rank, lay.completions_per_rank, lay.micro_batch) == (8, 64, 8)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rte' \(did you mean 'learning_rate'\?\)"):
        Config.from_dict({"learning_rte": 1e-6})


@pytest.mark.parametrize("key, value", [("learning_rate", "fast"), ("max_steps", 2.5), ("gradient_checkpointing", "yes"),
                                        ("num_generations", True), ("stop", "</answer>")])
def test_wrong_type_is_named(key, value):
    with pytest.raises(ConfigError, match=key):
        Config.from_dict({key: value})


@pytest.mark.parametrize(
    "values, key",
    [
        ({"num_generations": 1}, "num_generations"),
        ({"prompts_per_step": 1, "num_generations": 3, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
        ({"loss_type": "token"}, "loss_type"),
        ({"scale_rewards": "std"}, "scale_rewards"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"beta": -0.1}, "beta"),
        ({"rollout": "sglang"}, "rollout"),
        ({"deepspeed": "/no/such/file.json"}, "deepspeed"),
        ({"temperature": 0}, "temperature"),
        ({"rewards": []}, "rewards"),
        ({"rewards": ["format_reward", "format_reward"]}, "rewards"),
        ({"generator_min_numbers": 1}, "generator_min_numbers"),
        ({"generator_min_numbers": 4, "generator_max_numbers": 3}, "generator_min_numbers"),
        ({"generator_max_numbers": 7}, "generator_min_numbers"),
        ({"generator_max_number": 1000}, "generator_max_number"),
        ({"generator_max_target": 0}, "generator_max_target"),
        ({"log_level": "verbose"}, "log_level"),
    ],
)
def test_inconsistent_values_are_named(values, key):
    with pytest.raises(ConfigError, match=key):
        Config.from_dict(values)


def test_prompts_must_split_into_whole_groups_over_ranks():
    with pytest.raises(ConfigError, match="prompts_per_step=3 .* 2 ranks"):
        Config.from_dict({"prompts_per_step": 3, "gradient_accumulation_steps": 1}).layout(2)


def test_yaml_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 5.0e-7\nbeta: 0.001\nstop: ['</answer>']\n")
    cfg = Config.load(recipe, ["learning_rate=1e-6", "max_steps=3", "epsilon_high=0.28", "reward_weights=[1, 2]"])
    assert cfg.learning_rate == 1e-6  # YAML reads 1e-6 as a string; it is still a float here
    assert (cfg.beta, cfg.max_steps, cfg.epsilon_high, cfg.stop) == (0.001, 3, 0.28, ["</answer>"])
    assert cfg.reward_weights == [1.0, 2.0]
    with pytest.raises(ConfigError, match="not key=value"):
        Config.load(recipe, ["max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = Config.from_dict({"max_steps": 7, "epsilon_high": 0.3})
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml") == cfg


def test_python_construction_is_checked_too():
    with pytest.raises(ConfigError, match="num_generations"):
        Config(num_generations=1)
    with pytest.raises(ConfigError, match="learning_rate"):
        Config(learning_rate="fast")
    assert Config(learning_rate=1).learning_rate == 1.0


def test_generator_difficulty_is_the_generators_keywords():
    from minigrpo.data import generate_countdown

    cfg = Config(generator_min_numbers=2, generator_max_numbers=3, generator_max_number=20, generator_max_target=100)
    assert cfg.generator_difficulty() == {"min_numbers": 2, "max_numbers": 3, "max_number": 20, "max_target": 100}
    generate_countdown(5, seed=0, **cfg.generator_difficulty())  # every key is one of its parameters


def test_the_server_takes_its_own_share_of_its_gpu_not_the_colocated_one():
    """Issue 24: the 3B recipe's vllm_gpu_memory_utilization 0.3 (a GPU shared with training) was
    passed to the server's dedicated GPU. startup.engine_memory picks the KV-cache setting per layout."""
    from pathlib import Path

    from minigrpo.startup import engine_memory

    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "qwen2.5-3b-countdown.yaml")
    colocated = Config.load(recipe)
    server = Config.load(recipe, ["rollout=vllm_server", "vllm_server_devices=3"])
    assert engine_memory(colocated, on_gpu=True) == {"gpu_memory_utilization": 0.3}
    assert engine_memory(server, on_gpu=True) == {"gpu_memory_utilization": 0.9}  # the default
    assert engine_memory(Config.load(recipe, ["rollout=vllm_server", "vllm_server_gpu_memory_utilization=0.8"]),
                         on_gpu=True) == {"gpu_memory_utilization": 0.8}
    assert engine_memory(server, on_gpu=False) == {}  # on CPU the fraction is of a NUMA node: the engine's default
    assert engine_memory(Config(rollout="vllm_server", vllm_kv_cache_gib=1.5), on_gpu=True) == {"kv_cache_gib": 1.5}
    assert engine_memory(Config(), on_gpu=True) == {}  # colocated, unset: the engine's default (0.5 of a GPU)
    with pytest.raises(ConfigError, match="vllm_server_gpu_memory_utilization"):
        Config(vllm_server_gpu_memory_utilization=1.5)


@pytest.mark.process
def test_the_process_group_timeout_is_a_setting():
    """DeepSpeed's default (10 minutes) can run out while rank 0 alone starts the server or writes a
    large checkpoint (issue 24): `dist_timeout_minutes` (default 60) reaches the process group."""
    import subprocess
    import sys

    assert Config().dist_timeout_minutes == 60.0
    with pytest.raises(ConfigError, match="dist_timeout_minutes"):
        Config(dist_timeout_minutes=0)
    code = ("import torch, torch.distributed as dist\n"
            "from minigrpo.engine import init_distributed\n"
            "init_distributed('error', 1.5)\n"
            "backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu'))\n"
            "print('TIMEOUT', backend.options._timeout.total_seconds())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "TIMEOUT 90.0" in proc.stdout, proc.stderr[-2000:]
