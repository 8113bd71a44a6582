"""Every config group option and every experiment composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bgflow_mini import BoltzmannGenerator, Phase
from bgflow_mini.energies import Energy
from bgflow_mini.flows import Flow
from bgflow_mini.targets import as_target

CONFIGS = Path(__file__).parents[1] / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


def check_instantiable(cfg) -> None:
    system = instantiate(cfg.system.load)
    assert isinstance(cfg.system.name, str)
    flow = instantiate(cfg.flow)(dim=6, circular=[False, False, False, True, True, True])
    assert isinstance(flow, Flow)
    z = torch.randn(5, 6)
    x, logdet = flow(z)
    assert x.shape == (5, 6) and logdet.shape == (5,)
    params = torch.nn.Linear(2, 2).parameters()
    opt = torch.optim.Adam(params)
    if cfg.training.scheduler is not None:
        instantiate(cfg.training.scheduler)(opt, total_steps=100)
    phases = [Phase(**p) for p in OmegaConf.to_container(cfg.training.phases)]
    assert phases and all(p.steps > 0 for p in phases)
    target = as_target(system)
    assert target.name == cfg.system.name and len(target.default_states) == 2
    with target.energy(instantiate(cfg.energy)) as energy:
        assert isinstance(energy, Energy) and energy.dim == target.dim
        if cfg.training.regularization is not None:
            wrapped = instantiate(cfg.training.regularization)(energy)
            assert isinstance(wrapped, Energy)
    if target.kind == "toy":
        return
    md = OmegaConf.to_container(cfg.md)
    from bgflow_mini.md import resolve_settings

    resolve_settings(md, system.temperature)  # unknown keys raise


@pytest.mark.parametrize("group", ["system", "flow", "energy", "training", "md", "data"])
def test_every_group_option(group):
    opts = options(group)
    assert opts, f"no options in configs/{group}"
    for opt in opts:
        check_instantiable(compose_train([f"{group}={opt}"]))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    check_instantiable(cfg)


def test_ring_recipe_is_the_long_recipe_with_a_larger_flow():
    ring = OmegaConf.to_container(compose_train(["experiment=ring_dipeptide_long_rnvp"]))
    long = OmegaConf.to_container(
        compose_train(["experiment=dipeptide_long_rnvp", "system=tyr_dipeptide_vacuum"])
    )
    assert (ring["flow"]["n_blocks"], ring["flow"]["hidden"]) == (8, [128, 128])
    assert (long["flow"]["n_blocks"], long["flow"]["hidden"]) == (6, [96, 96])
    for cfg in (ring, long):
        del cfg["flow"]["n_blocks"], cfg["flow"]["hidden"]
    assert ring == long  # masks, bins, MD, data, phases, floor, selection: one recipe
    other = compose_train(["experiment=ring_dipeptide_long_rnvp", "system=trp_dipeptide_vacuum"])
    assert other.system.name == "trp_dipeptide_vacuum" and other.flow.n_blocks == 8


def test_cool_recipe_is_the_ring_recipe_with_a_cooling_phase():
    cool = OmegaConf.to_container(compose_train(["experiment=ring_dipeptide_cool_rnvp"]))
    ring = OmegaConf.to_container(compose_train(["experiment=ring_dipeptide_long_rnvp"]))
    phases = cool["training"].pop("phases")
    ring_phases = ring["training"].pop("phases")
    assert cool == ring  # flow, MD, data (the equal-weight mixture), floor, selection
    # the ML and mixed phases are the ring recipe's (a list is restated, not merged)
    assert phases[0] == ring_phases[0] and len(ring_phases) == 2
    assert {**phases[1], "steps": ring_phases[1]["steps"]} == ring_phases[1]
    assert [p["name"] for p in phases] == ["ml", "mixed", "cool"]
    assert sum(p["steps"] for p in phases[1:]) == 22000
    assert cool["data"]["replica_weights"] == "equal" and cool["data"]["replicas"] == 3
    assert phases[2]["replica_weights"] == "mbar" and "replica_weights" not in phases[1]
    assert phases[2]["w_kl"] == phases[2]["w_iw"] == phases[1]["w_iw"] == 1.0


def test_default_config_builds_a_generator_for_toys():
    from bgflow_mini import pipeline

    cfg = compose_train(["system=double_well"])
    energy = instantiate(cfg.system.load)
    data = pipeline.toy_data(energy, n_chains=8, n_steps=50, burn_in=10, thin=5)
    bg = pipeline.toy_generator(energy, data.train, instantiate(cfg.flow))
    assert isinstance(bg, BoltzmannGenerator)
    assert bg.log_weights(bg.sample(4)).shape == (4,)


def test_run_md_config_composes():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="run_md")
    assert cfg.system.name == "aldp_vacuum" and cfg.md.n_replicas >= 1


def test_typos_and_unknown_options_are_errors():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="system"):
        compose_train(["system=no_such_molecule"])
    with pytest.raises(ConfigCompositionException, match="flow"):
        compose_train(["flow=glow"])
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_train(["training.lrr=0.1"])
