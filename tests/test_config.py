"""Config loading: every shipped YAML validates; bad keys and values give messages that name
the key and what would be valid; overrides reach any key; derived sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kltrain.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    load_config,
    prompts_per_process,
    samples_per_step,
)

ROOT = Path(__file__).resolve().parents[1]
#: kltrain run configs: configs/accelerate/ holds Accelerate launcher configs (tested in
#: tests/test_world_size.py) and configs/sweep_*.yaml are sweeps (tests/test_sweep.py)
SHIPPED = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if "accelerate" not in p.parts and not p.name.startswith("sweep_")
)


def test_configs_folder_is_not_empty():
    assert len(SHIPPED) >= 4, SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path):
    from kltrain.objective import build_regulariser, optimizer_steps_per_batch

    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # the (estimator, placement) pair is allowed as shipped, on- or off-policy as configured
    build_regulariser(cfg.kl, optimizer_steps_per_batch(cfg))


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg.kl.divergence == "reverse_kl"
    assert cfg.model.trust_remote_code is False


def test_dotted_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nkl:\n  coef: 0.1\n")
    cfg = load_config(
        path,
        [
            "kl.divergence=forward_kl",
            "kl.coef=0.05",
            "trainer.max_steps=200",
            "tracking.wandb.tags=[a, b]",
        ],
    )
    assert cfg.kl.divergence == "forward_kl"
    assert cfg.kl.coef == 0.05
    assert cfg.trainer.max_steps == 200
    assert cfg.tracking.wandb.tags == ["a", "b"]


def test_misspelt_key_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"kl": {"divergnce": "js"}})
    msg = str(err.value)
    assert "kl.divergnce: unknown key" in msg
    assert "did you mean `kl.divergence`" in msg


def test_misspelt_section_suggests_nearest():
    with pytest.raises(ConfigError, match=r"did you mean `trainer`"):
        config_from_dict({"trainr": {"max_steps": 3}})


def test_unrelated_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"valid keys here: .*coef"):
        config_from_dict({"kl": {"zzzzzz": 1}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"trainer": {"max_steps": "many"}})
    assert "trainer.max_steps" in str(err.value)
    assert "'many'" in str(err.value)


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"kl.coef.*greater than or equal to 0"):
        config_from_dict({"kl": {"coef": -1}})


def test_literal_lists_choices():
    with pytest.raises(ConfigError, match=r"kl.estimator.*'k1'.*'k3'"):
        config_from_dict({"kl": {"estimator": "k4"}})


def test_unknown_divergence_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"kl": {"divergence": "rkl"}})
    msg = str(err.value)
    assert "kl.divergence" in msg
    for name in ("reverse_kl", "forward_kl", "js"):
        assert name in msg


def test_group_algorithms_need_two_samples():
    with pytest.raises(ConfigError, match=r"num_generations must be ≥ 2 for rloo"):
        config_from_dict({"algorithm": {"name": "rloo", "num_generations": 1}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kl: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_bad_override_form():
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(None, ["kl.coef"])


def test_derived_sizes():
    cfg = config_from_dict(
        {"trainer": {"prompts_per_step": 8}, "algorithm": {"num_generations": 4}}
    )
    assert samples_per_step(cfg) == 32
    assert prompts_per_process(cfg, 4) == 2
    with pytest.raises(ConfigError, match="multiple of 3"):
        prompts_per_process(cfg, 3)


def test_each_concept_has_one_list_of_names():
    """The config's Literals and the registries that implement them name the same things."""
    from typing import get_args

    from kltrain.algorithms import ALGORITHMS
    from kltrain.config import (
        AlgorithmName,
        ChatTemplateMode,
        DTypeName,
        EstimatorName,
        Placement,
    )
    from kltrain.data import CHAT_TEMPLATE_MODES
    from kltrain.divergence.estimators import ESTIMATOR_NAMES, PLACEMENTS
    from kltrain.models.loading import DTYPES
    from kltrain.rewards.reward_model import RewardModel

    assert set(ALGORITHMS) == set(get_args(AlgorithmName))
    assert set(DTYPES) == set(get_args(DTypeName)) == set(RewardModel.DTYPES)
    assert get_args(ChatTemplateMode) == CHAT_TEMPLATE_MODES
    assert get_args(EstimatorName) == ESTIMATOR_NAMES
    assert get_args(Placement) == PLACEMENTS
