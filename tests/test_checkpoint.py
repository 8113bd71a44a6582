"""Self-describing checkpoints: load_generator rebuilds a model from the file alone."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

import bgflow_mini as bg
from bgflow_mini.checkpoint import (
    find_checkpoint,
    flow_spec,
    load_generator,
    read_checkpoint,
    save_generator,
)
from bgflow_mini.energies import DoubleWell, MuellerBrown
from bgflow_mini.flows import coupling_flow
from bgflow_mini.targets import ToyTarget, as_target
from bgflow_mini.training import Phase, Trainer

FLOW = functools.partial(coupling_flow, kind="rnvp", n_blocks=2, hidden=[16], n_bins=4)


def _trained(target, data: torch.Tensor, dtype: torch.dtype, steps: int = 15, flow=FLOW):
    torch.manual_seed(0)
    gen = target.generator(data, flow, target.energy(None)).to(dtype=dtype)
    Trainer(gen, lr=3e-3, batch_size=64, progress=False).fit_phases(
        [Phase(steps, w_ml=1.0)], data=data
    )
    return gen.eval()


KINDS = {
    "rnvp": ("rnvp", {}),
    "spline": ("spline", {"tail_bound": 3.0}),
    "rnvp_random_masks": ("rnvp", {"masks": "random", "mask_seed": 5}),  # rebuilt from the seed
}


@pytest.mark.parametrize("variant", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_toy_generator_round_trip_is_exact(
    tmp_path: Path, dtype: torch.dtype, variant: str
) -> None:
    target = as_target(DoubleWell())
    data = DoubleWell().sample(512, seed=1)
    kind, extra = KINDS[variant]
    flow = functools.partial(FLOW, kind=kind, **extra)
    gen = _trained(target, data, dtype, flow=flow)
    save_generator(gen, tmp_path / "a" / "model.pt")
    alone = tmp_path / "b"  # no config file, no data: the checkpoint only
    alone.mkdir()
    shutil.copy(tmp_path / "a" / "model.pt", alone / "model.pt")
    loaded = load_generator(alone)
    x = data[:100].to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), gen.log_prob(x))
    assert next(loaded.parameters()).dtype == dtype
    assert loaded.energy is None and not loaded.training
    spec = read_checkpoint(alone / "model.pt")["spec"]
    assert spec["target"]["kind"] == "toy" and spec["version"] == bg.__version__
    assert spec["flow"]["kwargs"] == {**FLOW.keywords, "kind": kind, **extra}


def test_molecular_generator_round_trip_is_exact(tmp_path: Path) -> None:
    target = as_target("aldp_vacuum")
    ref = torch.as_tensor(target.system.positions, dtype=torch.float64).reshape(1, -1)
    data = ref + 0.002 * torch.randn(256, ref.shape[1], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    gen = target.generator(data, FLOW).float()
    Trainer(gen, lr=1e-3, batch_size=64, progress=False).fit_phases([Phase(5)], data=data)
    save_generator(gen.eval(), tmp_path / "model.pt")
    loaded = load_generator(tmp_path / "model.pt", target=target)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(data[:50].float()), gen.log_prob(data[:50].float()))
    spec = read_checkpoint(tmp_path / "model.pt")["spec"]
    assert len(spec["zmatrix"]) == 22 and sum(spec["circular"]) == int(gen.prior.circular.sum())
    assert spec["target"]["name"] == "aldp_vacuum" and len(spec["target"]["fingerprint"]) == 16


def test_trainer_checkpoint_is_loadable_and_other_target_is_refused(tmp_path: Path) -> None:
    target = as_target(DoubleWell())
    data = DoubleWell().sample(256, seed=2)
    gen = target.generator(data, FLOW, target.energy())
    trainer = Trainer(gen, batch_size=32, progress=False)
    trainer.fit(3, data=data)
    trainer.save_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "latest.pt"
    loaded = load_generator(tmp_path, target=target, energy=gen.energy)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(data[:8].float()), gen.log_prob(data[:8].float()))
    with pytest.raises(ValueError, match="fingerprint"):
        load_generator(tmp_path, target=ToyTarget(DoubleWell(c=2.0)))
    with pytest.raises(ValueError, match="fingerprint"):
        load_generator(tmp_path, target=MuellerBrown())


def _log_prob_with(gen, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``gen``'s log-density at ``x`` with ``params`` copied in (then restored)."""
    saved = [p.detach().clone() for p in gen.parameters()]
    with torch.no_grad():
        for p, t in zip(gen.parameters(), params, strict=True):
            p.copy_(t)
        out = gen.log_prob(x)
        for p, t in zip(gen.parameters(), saved, strict=True):
            p.copy_(t)
    return out


@pytest.mark.parametrize("weights", ["ema", "best_ess", "last"])
def test_training_checkpoint_weights_other_than_the_selected(tmp_path: Path, weights: str) -> None:
    target = as_target(DoubleWell())
    data = DoubleWell().sample(512, seed=4)
    torch.manual_seed(1)
    gen = target.generator(data, FLOW, target.energy()).double()
    trainer = Trainer(
        gen, lr=3e-3, batch_size=64, progress=False, ess_every=10, ess_samples=256, ema_decay=0.9
    )
    trainer.fit(30, data=data)
    trainer.ess_every = 0  # no estimate after step 30: the snapshot is older than the EMA
    trainer.fit(20, data=data)
    assert trainer.best["step"] <= 30 and trainer.step == 50
    trainer.save_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    want = {
        "ema": [t.clone() for t in trainer.ema],
        "best_ess": [t.clone() for t in trainer.best["params"]],
        "last": [p.detach().clone() for p in gen.parameters()],
    }
    trainer.finalize("best_ess")  # model.pt holds the selected (best-estimate) weights
    save_generator(gen.eval(), tmp_path / "model.pt")
    x = data[:64].double()
    # the three weight sets differ, so picking the wrong one would show
    lp = {k: _log_prob_with(gen, v, x) for k, v in want.items()}
    assert not torch.allclose(lp["ema"], lp["last"]) and not torch.allclose(
        lp["ema"], lp["best_ess"]
    )
    for where in (tmp_path, tmp_path / "checkpoints" / "latest.pt"):
        loaded = load_generator(where, target=target, weights=weights)
        for p, t in zip(loaded.parameters(), want[weights], strict=True):
            assert torch.equal(p, t)
        with torch.no_grad():
            assert torch.equal(loaded.log_prob(x), lp[weights])
    saved = load_generator(tmp_path)  # model.pt: what finalize chose
    with torch.no_grad():
        assert torch.equal(saved.log_prob(x), lp["best_ess"])
    assert find_checkpoint(tmp_path, weights) == tmp_path / "checkpoints" / "latest.pt"
    with pytest.raises(ValueError, match="model file .* training checkpoint"):
        load_generator(tmp_path / "model.pt", weights=weights)


def test_missing_training_weights_are_clear_errors(tmp_path: Path) -> None:
    target = as_target(DoubleWell())
    data = DoubleWell().sample(128, seed=5)
    gen = target.generator(data, FLOW)
    trainer = Trainer(gen, batch_size=32, progress=False)  # no EMA, no ESS estimates
    trainer.fit(2, data=data)
    save_generator(gen, tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="checkpoints/latest.pt"):
        load_generator(tmp_path, weights="ema")
    trainer.save_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    with pytest.raises(ValueError, match="no EMA"):
        load_generator(tmp_path, weights="ema")
    with pytest.raises(ValueError, match="no best-ESS snapshot"):
        load_generator(tmp_path, weights="best_ess")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_generator(tmp_path, weights="best")
    assert load_generator(tmp_path, weights="last") is not None


def test_broken_files_are_clear_errors(tmp_path: Path) -> None:
    target = as_target(DoubleWell())
    data = DoubleWell().sample(64, seed=3)
    gen = target.generator(data, FLOW)
    good = save_generator(gen, tmp_path / "checkpoints" / "best.pt")
    latest = tmp_path / "checkpoints" / "latest.pt"
    latest.write_bytes(good.read_bytes()[:200])  # truncated by a crash
    with pytest.raises(ValueError, match=r"latest\.pt.*truncated.*best\.pt"):
        load_generator(latest)
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "nothing_here")
    plain = tmp_path / "plain.pt"
    torch.save({"model": gen.state_dict()}, plain)  # no spec: an old or foreign file
    with pytest.raises(ValueError, match="no generator spec"):
        load_generator(plain)


def test_flow_spec_only_for_plain_partials() -> None:
    spec = flow_spec(FLOW)
    assert spec == {
        "target": "bgflow_mini.flows.coupling.coupling_flow",
        "kwargs": {"kind": "rnvp", "n_blocks": 2, "hidden": [16], "n_bins": 4},
    }
    assert flow_spec(lambda dim: coupling_flow(dim, 1)) is None
    assert flow_spec(functools.partial(coupling_flow, activation=torch.nn.SiLU)) is None


def _ring_system(tmp_path: Path) -> Path:
    """A system folder for the ACE-PHE-PRO-NME test peptide (vacuum)."""
    import mdtraj as md

    pdb = Path(__file__).resolve().parent / "data" / "ace_phe_pro_nme.pdb"
    folder = tmp_path / "phe_pro"
    folder.mkdir()
    shutil.copy(pdb, folder / "peptide.pdb")
    top = md.load(str(pdb)).topology
    phi = md.compute_phi(md.load(str(pdb)))[0][0].tolist()
    psi = md.compute_psi(md.load(str(pdb)))[0][0].tolist()
    assert top.n_atoms == 46
    (folder / "system.yaml").write_text(
        "name: phe_pro\npdb: peptide.pdb\nforcefield: [amber99sbildn.xml]\n"
        "nonbonded_method: NoCutoff\nconstraints: null\nrigid_water: false\n"
        f"temperature: 300.0\ncvs:\n  phi: {{type: torsion, atoms: {phi}}}\n"
        f"  psi: {{type: torsion, atoms: {psi}}}\nstates:\n"
        "  phi_negative: {phi: [-3.141592653589793, 0.0]}\n"
        "  phi_positive: {phi: [0.0, 2.0]}\n"
    )
    return folder


def test_ring_generator_round_trip_is_exact(tmp_path: Path) -> None:
    target = as_target(bg.systems.load_system(_ring_system(tmp_path)))
    ref = torch.as_tensor(target.system.positions, dtype=torch.float64).reshape(1, -1)
    data = ref + 0.002 * torch.randn(256, ref.shape[1], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    gen = target.generator(data, FLOW).double()
    assert sum(gen.spec["cartesian"]) == 3 + 4  # Pro: 3 of 5 ring atoms, Phe: 4 of 6
    Trainer(gen, lr=1e-3, batch_size=64, progress=False).fit_phases([Phase(5)], data=data)
    save_generator(gen.eval(), tmp_path / "model.pt")
    loaded = load_generator(tmp_path / "model.pt", target=target)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(data[:50]), gen.log_prob(data[:50]))
    internal = target.generator(data, FLOW, ring_coordinates="internal")
    assert sum(internal.spec["cartesian"]) == 0
    with pytest.raises(ValueError, match="ring_coordinates"):
        target.generator(data, FLOW, ring_coordinates="mixed")


def test_internal_coordinates_save_the_same_keys_as_before_ring_support() -> None:
    """Checkpoints written before ring support (without the Cartesian-row buffers) load:
    those buffers are derived from the spec and not saved."""
    import mdtraj as md

    from bgflow_mini.coordinates import InternalCoordinates

    traj = md.load(str(Path(__file__).resolve().parent / "data" / "ace_phe_pro_nme.pdb"))
    ic = InternalCoordinates.from_topology(traj.topology, traj.xyz[0])
    assert ic.cartesian_rows.any()
    assert set(ic.state_dict()) == {
        "zmatrix", "bond_idx", "angle_idx", "torsion_idx", "circular",
        "_b_atoms", "_a_atoms", "_t_atoms", "_gen_cols", "_gen_refs", "_atom_slot",
    }  # fmt: skip
