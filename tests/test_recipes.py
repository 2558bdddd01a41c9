"""Every recipe YAML loads through RetrofitConfig.from_dict (unknown keys are errors); launch configs parse."""
import json
from pathlib import Path

import pytest
import yaml

from dms.training import RetrofitConfig, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MODEL_RECIPES = sorted(RECIPES.glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in MODEL_RECIPES}
    assert {"qwen3_8b_cr8.yaml", "llama3_8b_cr8.yaml", "default_cpu.yaml"} <= names


@pytest.mark.parametrize("path", MODEL_RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    d = load_recipe(str(path))
    assert set(d) <= {"model", "data", "dms", "train"}
    cfg = RetrofitConfig.from_dict(d)
    assert cfg.train.steps >= 1 and cfg.train.cr >= 1


def test_unknown_key_is_an_error():
    d = load_recipe(str(RECIPES / "default_cpu.yaml"))
    d["train"]["stepz"] = 3
    with pytest.raises(ValueError, match="stepz"):
        RetrofitConfig.from_dict(d)


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs(path):
    c = yaml.safe_load(path.read_text())
    assert c["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")
    if c["distributed_type"] == "DEEPSPEED":
        ds = RECIPES.parent / c["deepspeed_config"]["deepspeed_config_file"]
        j = json.loads(ds.read_text())
        assert j["zero_optimization"]["stage"] in (2, 3)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            assert key in j  # "auto": filled by dms.training from the recipe


def test_build_config_from_cli_overrides_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("retrofit_cli", RECIPES.parent / "train" / "retrofit.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg, builtin = cli.build_config(cli.parse_args(["--recipe", str(RECIPES / "qwen3_8b_cr8.yaml"), "--steps", "7"]))
    assert cfg.train.steps == 7 and cfg.model.name_or_path == "Qwen/Qwen3-8B" and not builtin
