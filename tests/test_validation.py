"""Config validation: real configs pass, every kind of mistake is a ConfigError naming it."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bgflow_mini.apps.validation import (
    ConfigError,
    validate_free_energy_config,
    validate_run_md_config,
    validate_sample_config,
    validate_train_config,
)
from bgflow_mini.systems import load_system

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TARGET = SimpleNamespace(
    name="fake",
    cvs={"phi": {"type": "torsion", "atoms": [0, 1, 2, 3]}, "psi": {"type": "torsion"}},
    # (ranges [-3.2, 0] and [0, 3.2] would overlap near ±pi: torsion ranges wrap)
    states={"phi_negative": {"phi": [-math.pi, 0.0]}, "phi_positive": {"phi": [0.0, 3.0]}},
    default_states=("phi_negative", "phi_positive"),
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def load(name: str, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def raises(check, cfg, *texts: str, **kwargs) -> ConfigError:
    """``check(cfg)`` raises a ConfigError whose message contains every one of ``texts``."""
    with pytest.raises(ConfigError) as info:
        check(cfg, **kwargs)
    msg = str(info.value)
    for text in texts:
        assert text in msg, f"{text!r} not in:\n{msg}"
    return info.value


# --- real configs validate --------------------------------------------------------------


def test_default_train_config():
    cfg = load("train")
    validate_train_config(cfg)
    validate_train_config(cfg, target=TARGET)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment(experiment):
    validate_train_config(load("train", [f"experiment={experiment}"]), target=TARGET)


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={o}"
        for g in ("system", "md", "flow", "energy", "training", "data")
        for o in options(g)
    ],
)
def test_every_group_option(override):
    validate_train_config(load("train", [override]))


def test_toy_target_without_states_skips_state_checks():
    toy = SimpleNamespace(name="double_well")  # an analytic energy: no cvs / states
    validate_train_config(load("train", ["system=double_well"]), target=toy)


def test_default_sample_free_energy_run_md_configs():
    validate_sample_config(load("sample", ["checkpoint=x"]))
    validate_sample_config(load("sample", ["checkpoint=x", "energy=torchff", "dtype=float64"]))
    validate_free_energy_config(load("free_energy", ["samples=x"]))
    validate_free_energy_config(load("free_energy", ["checkpoint=x"]), target=TARGET)
    extra = "+states.alpha={phi: [0.5, 1.8], psi: [-1.5, 0.5]}"
    validate_free_energy_config(
        load("free_energy", ["samples=x", extra, "state_b=alpha"]), target=TARGET
    )
    for md in options("md"):
        validate_run_md_config(load("run_md", [f"md={md}"]))


def test_plain_dict_is_accepted():
    from omegaconf import OmegaConf

    validate_sample_config(OmegaConf.to_container(load("sample", ["checkpoint=x"])))


# --- train config mistakes --------------------------------------------------------------

INT1 = "must be an integer >= 1"
TRAIN_BAD = [
    (["training.phases.0.steps=0"], ["training.phases.0.steps=0", INT1]),
    (["training.phases.0.steps=2.5"], ["training.phases.0.steps=2.5", INT1]),
    (["training.phases.0.steps=true"], ["training.phases.0.steps=True", INT1]),
    (["training.phases.1.steps=abc"], ["training.phases.1.steps='abc'", INT1]),
    (["training.phases=[]"], ["training.phases=[]", "non-empty list"]),
    (
        ["training.phases.1.w_kl=0", "training.phases.1.w_ml=0", "training.phases.1.w_iw=0"],
        ["training.phases.1", "all 0"],
    ),
    (["training.phases.0.w_ml=-1"], ["training.phases.0.w_ml=-1", ">= 0"]),
    (["training.phases.1.lr=-0.1"], ["training.phases.1.lr=-0.1", "> 0"]),
    (["+training.phases.0.batch_size=0"], ["training.phases.0.batch_size=0", ">= 1"]),
    (["+training.phases.0.epochs=3"], ["training.phases.0.epochs: unknown key", "'steps'"]),
    (["training.batch_size=abc"], ["training.batch_size='abc'", INT1]),
    (["training.kl_batch_size=0"], ["training.kl_batch_size=0", INT1]),
    (["training.lr=-1e-3"], ["training.lr=-0.001", "a number > 0"]),
    (["training.lr=abc"], ["training.lr='abc'", "a number > 0"]),
    (["training.clip_grad_norm=0"], ["training.clip_grad_norm=0", "null or a number > 0"]),
    (["training.weight_decay=-1"], ["training.weight_decay=-1", ">= 0"]),
    (["training.ess_every=-1"], ["training.ess_every=-1", "integer >= 0"]),
    (["training.ess_samples=0"], ["training.ess_samples=0", INT1]),
    (["training.eval_every=1.5"], ["training.eval_every=1.5", "integer >= 0"]),
    (["training.metrics_every=0"], ["training.metrics_every=0", INT1]),
    (["training.checkpoint_every=0"], ["training.checkpoint_every=0", INT1]),
    (["training.sync_every=0"], ["training.sync_every=0", "null or an integer >= 1"]),
    (["training.compile=yes"], ["training.compile='yes'", "true or false"]),
    (
        ["training.sync_every=40"],
        ["training.checkpoint_every=250", "multiple of training.sync_every=40"],
    ),
    (["evaluation.n_samples=0"], ["evaluation.n_samples=0", INT1]),
    (["evaluation.batch_size=-5"], ["evaluation.batch_size=-5", INT1]),
    (["evaluation.bins=0"], ["evaluation.bins=0", INT1]),
    (["evaluation.n_bootstrap=abc"], ["evaluation.n_bootstrap='abc'", INT1]),
    (
        ["evaluation.state_a=phi_negative", "evaluation.state_b=phi_negative"],
        ["evaluation.state_a, evaluation.state_b", "both"],
    ),
    (["data.fractions=[0.8,0.2]"], ["data.fractions=[0.8, 0.2]", "3 numbers > 0"]),
    (["data.fractions=[0,0.5,0.5]"], ["data.fractions=[0, 0.5, 0.5]", "3 numbers > 0"]),
    (["data.fractions=[0.9,0.1,0]"], ["data.fractions=[0.9, 0.1, 0]", "test metrics need"]),
    (["data.toy.n_steps=5", "data.toy.thin=10"], ["data.toy.n_steps=5", "thin=10"]),
    (["data.fractions=[0.8,-0.1,0.3]"], ["data.fractions=[0.8, -0.1, 0.3]", "> 0"]),
    (["data.stride=0"], ["data.stride=0", INT1]),
    (["data.n_workers=0"], ["data.n_workers=0", "null or an integer >= 1"]),
    (["seed=abc"], ["seed='abc'", "must be an integer"]),
    (["dtype=float16"], ["dtype='float16'", "['float32', 'float64']"]),
    (["device=tpu"], ["device='tpu'", "['auto', 'cpu', 'cuda', 'cuda:N']"]),
    (["device=cuda0"], ["device='cuda0'", "'cuda:N'"]),
    (["num_threads=0"], ["num_threads=0", "null or an integer >= 1"]),
    (["progress=maybe"], ["progress='maybe'", "true or false"]),
    (["md.n_frames=0"], ["md.n_frames=0", INT1]),
    (["md.save_every=0"], ["md.save_every=0", INT1]),
    (["md.n_replicas=0"], ["md.n_replicas=0", INT1]),
    (["md.timestep=0"], ["md.timestep=0", "a number > 0"]),
    (["md.hydrogen_mass=-4"], ["md.hydrogen_mass=-4", "null or a number > 0"]),
    (["md.friction=-1"], ["md.friction=-1", ">= 0"]),
    (["md.temperature=-300"], ["md.temperature=-300", "null or a number > 0"]),
    (["md.t_max=0"], ["md.t_max=0", "> 0"]),
    (["md.swap_every=0"], ["md.swap_every=0", INT1]),
    (["md.equilibration_steps=-1"], ["md.equilibration_steps=-1", "integer >= 0"]),
    (["md.temperatures=[]"], ["md.temperatures=[]", "non-empty list"]),
    (["+md.n_step=5"], ["md.n_step: unknown key", "'n_frames'"]),
    (["md.keep_replicas=0"], ["md.keep_replicas=0", INT1]),
    (["md.keep_replicas=9"], ["md.keep_replicas=9", "at most the 8 replicas"]),
    (["data.replicas=3"], ["data.replicas=3", "md.keep_replicas=1", "set md.keep_replicas=3"]),
    (["data.replicas=0"], ["data.replicas=0", INT1]),
    (["data.replica_weights=kish"], ["data.replica_weights='kish'", "['equal', 'mbar']"]),
    (
        ["+training.phases.1.replica_weights=kish"],
        ["training.phases.1.replica_weights='kish'", "null or one of ['equal', 'mbar']"],
    ),
    (
        ["+training.phases.1.replica_weights=mbar"],
        ["training.phases.1.replica_weights='mbar'", "data.replicas=1 pools none"],
    ),
    (["evaluation.md_reference_seeds=[-1]"], ["md_reference_seeds=[-1]", "integer >= 0"]),
    (["evaluation.md_reference_seeds=[0]"], ["md_reference_seeds=[0]", "from md.seed=0"]),
    (["evaluation.md_reference_seeds=[2,2]"], ["md_reference_seeds=[2, 2]", "differ"]),
    (["md.seed=3", "evaluation.md_reference_seeds=[3]"], ["md.seed=3", "understate"]),
    (["flow.n_blocks=0"], ["flow.n_blocks=0", INT1]),
    (["flow.hidden=[]"], ["flow.hidden=[]", "non-empty list, each an integer >= 1"]),
    (["flow.hidden=[64,0]"], ["flow.hidden=[64, 0]", "integer >= 1"]),
    (["flow.kind=maf"], ["flow.kind='maf'", "['nice', 'rnvp', 'spline']"]),
    (["flow=spline", "flow.tail_bound=0"], ["flow.tail_bound=0", "> 0"]),
    (["ring_coordinates=mixed"], ["ring_coordinates='mixed'", "['cartesian', 'internal']"]),
    (["bounded_ics=boxed"], ["bounded_ics='boxed'", "true, false or box"]),
    (["training.max_skipped=0"], ["training.max_skipped=0", "(0, 1]"]),
    (["training.stall_window=0"], ["training.stall_window=0"]),
    (["flow.n_bins=1"], ["flow.n_bins=1", "integer >= 2"]),
    (["flow.activation=swish"], ["flow.activation='swish'", "'leaky_relu'", "'silu'"]),
    (
        ["data_dir=${oc.env:BGFLOW_VALIDATION_UNSET}"],
        ["data_dir: cannot resolve", "BGFLOW_VALIDATION_UNSET"],
    ),
]


@pytest.mark.parametrize(("overrides", "texts"), TRAIN_BAD, ids=lambda x: str(x))
def test_bad_train_config(overrides, texts):
    raises(validate_train_config, load("train", overrides), *texts)


def test_device_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    for dev in ("cuda", "cuda:1"):
        raises(validate_train_config, load("train", [f"device={dev}"]), "device=", "no CUDA")
        raises(validate_sample_config, load("sample", ["checkpoint=x", f"device={dev}"]), "CUDA")


def test_unknown_evaluation_state_with_target():
    cfg = load("train", ["evaluation.state_b=phi_positiv"])
    validate_train_config(cfg)  # without a target the names cannot be checked
    raises(
        validate_train_config,
        cfg,
        "evaluation.state_b='phi_positiv'",
        "unknown state",
        "'fake'",
        "['phi_negative', 'phi_positive']",
        target=TARGET,
    )


def test_null_states_are_the_target_defaults():
    target = TARGET
    null = ["evaluation.state_a=null", "evaluation.state_b=null", "flow.activation=ReLU"]
    validate_train_config(load("train", null), target=target)
    validate_free_energy_config(
        load("free_energy", ["samples=x", "state_a=null", "state_b=null"]), target=target
    )
    cfg = load("train", ["evaluation.state_a=null", "evaluation.state_b=phi_negative"])
    raises(validate_train_config, cfg, "both are 'phi_negative'", target=target)


def test_md_reference_seeds_are_for_molecules():
    toy = SimpleNamespace(kind="toy", name="double_well", cvs={}, states={})
    cfg = load("train", ["system=double_well", "evaluation.md_reference_seeds=[1]"])
    raises(validate_train_config, cfg, "md_reference_seeds=[1]", "for molecules", target=toy)
    validate_train_config(load("train", ["evaluation.md_reference_seeds=[1,2]"]), target=TARGET)


def test_toy_target_states_are_checked():
    toy = SimpleNamespace(
        name="double_well", cvs={"x1": {}}, states={"A": {"x1": [-9, 0]}, "B": {"x1": [0, 9]}}
    )
    validate_train_config(load("train", ["system=double_well"]), target=toy)  # null: A, B
    cfg = load("train", ["system=double_well", "evaluation.state_a=phi_negative"])
    raises(
        validate_train_config, cfg, "evaluation.state_a='phi_negative'", "['A', 'B']", target=toy
    )


def test_target_state_with_unknown_cv():
    states = {**TARGET.states, "c7eq": {"chi": [0.0, 1.0]}}
    target = SimpleNamespace(name="fake", cvs=TARGET.cvs, states=states)
    raises(
        validate_train_config,
        load("train"),
        "system.states.c7eq.chi",
        "unknown CV 'chi'",
        "['phi', 'psi']",
        target=target,
    )


def test_several_problems_in_one_message():
    cfg = load(
        "train",
        ["training.phases.0.steps=0", "training.batch_size=abc", "dtype=half", "md.timestep=0"],
    )
    err = raises(
        validate_train_config,
        cfg,
        "4 problems",
        "training.phases.0.steps=0",
        "training.batch_size='abc'",
        "dtype='half'",
        "md.timestep=0",
    )
    assert isinstance(err, ValueError) and len(err.problems) == 4
    assert len(str(err).splitlines()) == 5  # header + one line per problem


# --- sample and free-energy config mistakes ---------------------------------------------

SAMPLE_BAD = [
    ([], ["checkpoint: missing", "non-empty string"]),
    (["checkpoint=x", "formats=[h5,xyz]"], ["formats=['h5', 'xyz']", "['dcd', 'h5', 'pdb']"]),
    (["checkpoint=x", "formats=h5"], ["formats='h5'", "list"]),
    (["checkpoint=x", "n_samples=0"], ["n_samples=0", INT1]),
    (["checkpoint=x", "batch_size=abc"], ["batch_size='abc'", INT1]),
    (["checkpoint=x", "dtype=float16"], ["dtype='float16'", "null or one of"]),
    (["checkpoint=x", "device=gpu"], ["device='gpu'", "'cuda:N'"]),
    (["checkpoint=x", "num_threads=-1"], ["num_threads=-1", ">= 1"]),
    (["checkpoint=x", "seed=1.5"], ["seed=1.5", "integer"]),
]


@pytest.mark.parametrize(("overrides", "texts"), SAMPLE_BAD, ids=lambda x: str(x))
def test_bad_sample_config(overrides, texts):
    raises(validate_sample_config, load("sample", overrides), *texts)


FE_BAD = [
    (["bins=1"], ["bins=1", "integer >= 2"]),
    (["n_bootstrap=0"], ["n_bootstrap=0", INT1]),
    (["n_blocks=1"], ["n_blocks=1", "integer >= 2"]),
    (["cvs=[phi,chi]"], ["cvs.1='chi'", "unknown CV", "['phi', 'psi']"]),
    (["cvs_2d=[[phi,chi]]"], ["cvs_2d.0.1='chi'", "unknown CV"]),
    (["cvs_2d=[[phi]]"], ["cvs_2d=[['phi']]", "2-item list"]),
    (["state_b=alpha"], ["state_b='alpha'", "unknown state", "['phi_negative', 'phi_positive']"]),
    (["state_b=phi_negative"], ["state_a, state_b", "different"]),
    (["+states.alpha={psi: [0.5, 0.5]}"], ["states.alpha.psi=[0.5, 0.5]", "lo < hi"]),
    (["+states.alpha={chi: [0.0, 1.0]}"], ["states.alpha.chi", "unknown CV 'chi'"]),
    (["+states.alpha={psi: 1.0}"], ["states.alpha.psi=1.0", "[lo, hi]"]),
    (["checkpoint=y"], ["samples, checkpoint: both given", "exactly one"]),
    (["samples=null"], ["samples, checkpoint: neither given", "exactly one"]),
    (["pmf_max_f=0"], ["pmf_max_f=0", "> 0"]),
    (["dtype=double"], ["dtype='double'", "['float32', 'float64']"]),
]


@pytest.mark.parametrize(("overrides", "texts"), FE_BAD, ids=lambda x: str(x))
def test_bad_free_energy_config(overrides, texts):
    cfg = load("free_energy", ["samples=x", *overrides])
    raises(validate_free_energy_config, cfg, *texts, target=TARGET)


def test_free_energy_needs_a_molecular_target():
    cfg = load("free_energy", ["samples=x"])
    raises(
        validate_free_energy_config,
        cfg,
        "'double_well'",
        "no CVs or states",
        target=SimpleNamespace(name="double_well"),
    )


def test_bad_run_md_config():
    cfg = load("run_md", ["md.n_frames=abc", "n_workers=0"])
    raises(validate_run_md_config, cfg, "md.n_frames='abc'", "n_workers=0", "2 problems")


def test_torsion_ranges_may_cross_the_cut_and_other_ranges_may_not():
    wrap = "+states.wrap={phi: [0.0, 3.0], psi: [2.5, -2.5]}"
    cfg = load("free_energy", ["samples=x", wrap, "state_b=wrap"])
    validate_free_energy_config(cfg, target=TARGET)  # psi is a torsion: across +-pi
    toy = SimpleNamespace(
        name="toy",
        cvs={"x1": {"type": "coordinate", "index": 0}},
        states={"A": {"x1": [-9, 0]}, "B": {"x1": [0, 9]}},
        default_states=("A", "B"),
    )
    bad = load("free_energy", ["samples=x", "+states.C={x1: [2, -2]}", "state_b=C"])
    raises(validate_free_energy_config, bad, "states.C.x1=[2, -2]", "lo < hi", target=toy)


class _OneState:
    """A target with a single state: no default pair."""

    name, kind, cvs = "one", "toy", TARGET.cvs
    states = {"s": {"phi": [0.0, 1.0]}}

    @property
    def default_states(self):
        raise ValueError("target 'one' defines fewer than two states: ['s']")


def test_molecule_needs_md_and_two_states():
    molecule = SimpleNamespace(**vars(TARGET), kind="molecular")
    cfg = OmegaConf.to_container(load("train"), resolve=True)
    cfg["md"] = None
    raises(validate_train_config, cfg, "md=None", "a molecule needs MD settings", target=molecule)
    raises(validate_train_config, load("train"), "no default states", target=_OneState())


# --- peptides: many named CVs, states on any of them, disjoint ΔF states -------------------

_T = {"type": "torsion", "atoms": [0, 1, 2, 3]}
PEPTIDE = SimpleNamespace(
    name="pep",
    kind="molecular",
    cvs={
        **{f"{k}_{i}": _T for i in (1, 2) for k in ("phi", "psi", "chi1")},
        "d_hb": {"type": "distance", "atoms": [0, 3]},
    },
    states={
        "phi_1_negative": {"phi_1": [-math.pi, 0.0]},
        "phi_1_positive": {"phi_1": [0.0, 2.0]},
        "phi_2_negative": {"phi_2": [-math.pi, 0.0]},
        "phi_2_positive": {"phi_2": [0.0, 2.0]},
        "chi1_1_trans": {"chi1_1": [2.1, -2.1]},  # across the ±pi cut
        "chi1_1_gplus": {"chi1_1": [0.0, 2.1]},
        "c7eq_2": {"phi_2": [-math.pi, 0.0], "psi_2": [0.5, 2.5], "d_hb": [0.0, 0.25]},
    },
    default_states=("phi_1_negative", "phi_1_positive"),
)


def test_peptide_states_on_any_named_cv_validate():
    validate_train_config(load("train"), target=PEPTIDE)
    cfg = load("train", ["evaluation.state_a=chi1_1_gplus", "evaluation.state_b=chi1_1_trans"])
    validate_train_config(cfg, target=PEPTIDE)
    fe_cfg = ["samples=x", "state_a=phi_2_positive", "state_b=c7eq_2", "cvs_2d=[[phi_2,psi_2]]"]
    validate_free_energy_config(load("free_energy", fe_cfg), target=PEPTIDE)


def test_a_state_on_an_undefined_cv_is_refused_before_training():
    """The user's case: a state on chi1 of a system that defines only phi and psi (a
    KeyError after training before): the train config is refused naming the CV."""
    from bgflow_mini.targets import MolecularTarget

    target = MolecularTarget(load_system("aldp_vacuum"))
    target.system.states = {**target.system.states, "chi1_g": {"chi1": [0.0, 2.0]}}
    raises(
        validate_train_config,
        load("train"),
        "system.states.chi1_g.chi1",
        "unknown CV 'chi1'",
        "['phi', 'psi']",
        target=target,
    )
    cfg = load("free_energy", ["samples=x"])
    raises(validate_free_energy_config, cfg, "unknown CV 'chi1'", target=target)


def test_delta_f_states_that_can_overlap_are_refused():
    cfg = load("train", ["evaluation.state_a=phi_1_negative", "evaluation.state_b=c7eq_2"])
    raises(
        validate_train_config,
        cfg,
        "evaluation.state_a='phi_1_negative', evaluation.state_b='c7eq_2'",
        "can overlap",
        target=PEPTIDE,
    )
    # a rotamer state across the cut overlaps a range that reaches past -2.1
    bad = ["samples=x", "+states.g={chi1_1: [-3.0, -1.0]}", "state_a=g", "state_b=chi1_1_trans"]
    raises(validate_free_energy_config, load("free_energy", bad), "can overlap", target=PEPTIDE)
    ok = ["samples=x", "+states.g={chi1_1: [-2.1, -1.0]}", "state_a=g", "state_b=chi1_1_trans"]
    validate_free_energy_config(load("free_energy", ok), target=PEPTIDE)


def test_symmetrize_checks_the_flips_before_any_work(monkeypatch):
    from bgflow_mini import symmetry
    from bgflow_mini.targets import as_target

    phe = as_target("phe_dipeptide_vacuum")
    cfg = load("train", ["system=phe_dipeptide_vacuum"])
    validate_train_config(cfg, target=phe)  # one ring flip: fine (the default)
    monkeypatch.setattr(symmetry, "MAX_FLIPS", 0)
    raises(validate_train_config, cfg, "symmetrize=true: 1 symmetric side chains", target=phe)
    validate_train_config(
        load("train", ["system=phe_dipeptide_vacuum", "symmetrize=false"]), target=phe
    )
    from bgflow_mini.energies import DoubleWell

    toy = as_target(DoubleWell())  # nothing to flip: symmetrize=true (the default) is a no-op
    validate_train_config(load("train", ["system=double_well"]), target=toy)


def test_replica_pool_checks_pymbar_before_any_md(monkeypatch):
    """Pooled replicas need pymbar (MBAR weights for training and the MD reference):
    without it the config is refused before any MD is run."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pymbar" else real(name, *a)
    )
    pooled = ["md.keep_replicas=2", "data.replicas=2"]
    raises(validate_train_config, load("train", pooled), "data.replicas=2", "bgflow_mini[mbar]")
    equal = load("train", [*pooled, "data.replica_weights=equal"])
    raises(validate_train_config, equal, "data.replicas=2", "bgflow_mini[mbar]")
    validate_train_config(load("train", ["md.keep_replicas=2"]))  # saving them needs nothing
    fe = ["samples=x", "md_replicas=2"]
    raises(validate_free_energy_config, load("free_energy", fe), "md_replicas=2", "[mbar]")
    validate_free_energy_config(load("free_energy", ["samples=x", "md_replicas=1"]))
    validate_free_energy_config(load("free_energy", ["samples=x"]))  # auto: known later


def test_a_state_floor_the_states_cannot_hold_is_refused_before_any_work():
    from bgflow_mini.targets import as_target

    trp = as_target("trp_dipeptide_vacuum")  # three chi1 rotamers that exclude one another
    ok = load("train", ["system=trp_dipeptide_vacuum", "data.state_floor=0.3"])
    validate_train_config(ok, target=trp)
    bad = load("train", ["system=trp_dipeptide_vacuum", "data.state_floor=0.4"])
    raises(
        validate_train_config, bad, "data.state_floor=0.4", "chi1_plus", "at most 0.3333",
        target=trp,
    )  # fmt: skip
    validate_train_config(bad, target=TARGET)  # two exclusive states: 0.4 each can hold
    nostates = SimpleNamespace(**{**vars(TARGET), "states": {}})
    raises(validate_train_config, bad, "defines none", target=nostates)


def test_state_feedback_settings_are_checked_before_any_work():
    from bgflow_mini.targets import as_target

    trp = as_target("trp_dipeptide_vacuum")
    good = ["experiment=ring_dipeptide_feedback_rnvp", "system=trp_dipeptide_vacuum"]
    validate_train_config(load("train", good), target=trp)
    bad = load("train", [*good, "training.state_feedback.gain=0", "training.ess_every=0",
                         "training.state_feedback.tolerance=-1"])  # fmt: skip
    raises(
        validate_train_config, bad, "state_feedback.gain=0", "state_feedback.tolerance=-1",
        "training.ess_every > 0", target=trp,
    )  # fmt: skip
    stateless = SimpleNamespace(name="blob", cvs={}, states={}, default_states=())
    raises(validate_train_config, load("train", good), "blob defines none", target=stateless)
    raises(validate_train_config, load("train", ["training.state_feedback=3"]), "_target_")
