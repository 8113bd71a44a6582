"""Tests of the Trainer: losses, phases, skipped steps, clipping, checkpoint/resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bgflow_mini import BoltzmannGenerator, StandardNormal
from bgflow_mini.energies import Energy, LinLogCut
from bgflow_mini.flows import coupling_flow
from bgflow_mini.training import Phase, Trainer, TrainingStalled


def shifted_gaussian(x):
    """u = |x - 1|^2 / 2 (a unit Gaussian centred at 1), shape (batch,)."""
    return 0.5 * ((x - 1.0) ** 2).sum(-1)


def make_bg(kind="rnvp", seed=0):
    torch.manual_seed(seed)
    flow = coupling_flow(2, 2, hidden=(16, 16), kind=kind)
    return BoltzmannGenerator(StandardNormal(2), flow, shifted_gaussian)


def data(n=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) + 1.0


@pytest.mark.parametrize("kind", ["rnvp", "nice"])
def test_ml_and_kl_reduce_losses(kind):
    bg = make_bg(kind)
    trainer = Trainer(bg, lr=5e-3, batch_size=128, progress=False)
    hist = trainer.fit(150, data=data(), w_ml=1.0)
    first = sum(r["nll"] for r in hist[:10]) / 10
    last = sum(r["nll"] for r in hist[-10:]) / 10
    assert last < first - 0.3
    hist = trainer.fit(100, w_ml=0.0, w_kl=1.0)
    # the reverse KL is bounded below by -log Z = -log(2 pi) for this target
    assert hist[-1]["kl"] > -math.log(2 * math.pi) - 0.2
    assert sum(r["kl"] for r in hist[-10:]) / 10 < -math.log(2 * math.pi) + 0.1
    assert trainer.step == 250 and len(trainer.history) == 250


def test_phases_and_resume_give_identical_losses(tmp_path):
    phases = [
        Phase(steps=12, w_ml=1.0, lr=3e-3, name="ml"),
        Phase(steps=12, w_ml=0.5, w_kl=1.0, lr=1e-3, name="mixed"),
    ]
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)  # noqa: E731
    kw = dict(batch_size=32, kl_batch_size=32, ess_every=5, ess_samples=64, progress=False)
    kw["ema_decay"] = 0.9

    full = Trainer(make_bg(), scheduler=sched, **kw)
    full.fit_phases(phases, data=data())
    ref = [(r["loss"], r["lr"], r.get("ess_eval")) for r in full.history]
    assert len(ref) == 24 and full.history[-1]["phase"] == "mixed"

    # interrupted run: stop in the middle of phase 2, then resume in a fresh process-like state
    part = Trainer(make_bg(), scheduler=sched, **kw)
    part.fit_phases([phases[0], Phase(**{**phases[1].__dict__, "steps": 5})], data=data())
    ckpt = part.save_checkpoint(tmp_path / "ckpt.pt", extra={"system": "toy"})
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it

    resumed = Trainer(make_bg(seed=99), scheduler=sched, **kw)
    assert resumed.load_checkpoint(ckpt) == {"system": "toy"}
    assert resumed.step == 17
    resumed.fit_phases(phases, data=data())
    got = [(r["loss"], r["lr"], r.get("ess_eval")) for r in resumed.history]
    assert got == ref
    # energy calls: 12 mixed steps of 32 samples + ESS estimates at steps 5, 10, 15, 20
    assert full.n_energy_evaluations == resumed.n_energy_evaluations == 12 * 32 + 4 * 64
    # the average and the selected weights resume exactly too
    assert all(torch.equal(a, b) for a, b in zip(full.ema, resumed.ema, strict=True))
    assert full.best["step"] == resumed.best["step"] and full.best["ess"] == resumed.best["ess"]


def test_ema_and_selection_by_ess():
    trainer = Trainer(
        make_bg(),
        lr=5e-3,
        batch_size=64,
        ess_every=10,
        ess_samples=256,
        ema_decay=0.95,
        progress=False,
    )
    trainer.fit(60, data=data(), w_ml=1.0)
    params = [p.detach().clone() for p in trainer.generator.parameters()]
    assert not all(torch.equal(p, e) for p, e in zip(params, trainer.ema, strict=True))
    with trainer.averaged_weights():
        inside = [p.detach().clone() for p in trainer.generator.parameters()]
    assert all(torch.equal(p, e) for p, e in zip(inside, trainer.ema, strict=True))
    assert all(  # restored after the block
        torch.equal(p, q) for p, q in zip(params, trainer.generator.parameters(), strict=True)
    )
    # the kept weights are those of the step with the best periodic estimate
    estimates = {r["step"]: r["ess_eval"] for r in trainer.history if "ess_eval" in r}
    assert len(estimates) == 6
    assert trainer.best["step"] == max(estimates, key=estimates.get)
    assert trainer.best["ess"] == max(estimates.values())
    chosen = trainer.finalize("best_ess")
    assert chosen == {"kind": "best_ess", "step": trainer.best["step"], "ess": trainer.best["ess"]}
    now = list(trainer.generator.parameters())
    assert all(torch.equal(p, b) for p, b in zip(now, trainer.best["params"], strict=True))
    assert trainer.finalize("ema")["kind"] == "ema"
    assert all(torch.equal(p, e) for p, e in zip(now, trainer.ema, strict=True))
    plain = Trainer(make_bg(), progress=False)  # no estimate, no average: the last weights
    assert plain.finalize("best_ess") == {"kind": "last", "step": 0}
    with pytest.raises(ValueError, match="ema_decay"):
        Trainer(make_bg(), ema_decay=1.5)
    with pytest.raises(ValueError, match="select"):
        trainer.finalize("median")


def test_checkpoint_from_other_model_is_rejected(tmp_path):
    t = Trainer(make_bg(), progress=False)
    path = t.save_checkpoint(tmp_path / "a.pt")
    torch.manual_seed(0)
    other = BoltzmannGenerator(StandardNormal(3), coupling_flow(3, 2), shifted_gaussian)
    with pytest.raises(ValueError, match="does not match"):
        Trainer(other, progress=False).load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        t.load_checkpoint(tmp_path / "missing.pt")


def test_nonfinite_loss_step_is_skipped_and_counted():
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        u = shifted_gaussian(x)
        if calls["n"] % 2 == 0:  # every second call: NaN energy for the whole batch
            return torch.full_like(u, math.nan)
        return u

    bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1), flaky)
    trainer = Trainer(bg, kl_batch_size=16, w_ml=0.0, w_kl=1.0, progress=False)
    before = [p.detach().clone() for p in bg.parameters()]
    hist = trainer.fit(1, w_ml=0.0, w_kl=1.0)
    assert not hist[0]["skipped"]
    mid = [p.detach().clone() for p in bg.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, mid))
    moments = [{k: v.clone() for k, v in st.items()} for st in trainer.optimizer.state.values()]
    hist = trainer.fit(1, w_ml=0.0, w_kl=1.0)
    assert hist[0]["skipped"] and trainer.n_skipped == 1
    after = [p.detach() for p in bg.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(mid, after))  # never applied
    # neither Adam's moments nor its step count moved
    for old, st in zip(moments, trainer.optimizer.state.values(), strict=True):
        assert all(torch.equal(old[k], st[k]) for k in old)


def test_a_run_whose_steps_are_nearly_all_skipped_stops_with_a_clear_error(tmp_path):
    calls = {"n": 0}

    def broken_after(x, start=30):  # finite for the first 30 calls, then NaN for all
        calls["n"] += 1
        u = shifted_gaussian(x)
        return u if calls["n"] <= start else torch.full_like(u, math.nan)

    bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1), broken_after)
    ckpt = tmp_path / "ckpt.pt"
    trainer = Trainer(
        bg, kl_batch_size=16, w_ml=0.0, w_kl=1.0, progress=False, stall_window=20,
        max_skipped=0.9, checkpoint_path=ckpt, checkpoint_every=10,
    )  # fmt: skip
    with pytest.raises(TrainingStalled, match=r"19 of the last 20 steps were skipped.*ckpt\.pt"):
        trainer.fit(200)
    assert trainer.step == 49 and trainer.n_skipped == 19  # stopped as soon as it could tell

    # half the steps skipped is not a stall (the default allows up to 90 %)
    def every_second(x):
        calls["n"] += 1
        u = shifted_gaussian(x)
        return u if calls["n"] % 2 else torch.full_like(u, math.nan)

    half = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1), every_second)
    t2 = Trainer(half, kl_batch_size=16, w_ml=0.0, w_kl=1.0, progress=False, stall_window=20)
    t2.fit(60)
    assert t2.n_skipped == 30
    with pytest.raises(ValueError, match="stall_window"):
        Trainer(bg, stall_window=0)


def test_infinite_energies_dropped_and_counted():
    def partly_inf(x):
        u = shifted_gaussian(x)
        return torch.where(x[:, 0] > 1.5, torch.full_like(u, math.inf), u)

    bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1), partly_inf)
    trainer = Trainer(bg, kl_batch_size=256, w_ml=0.0, w_kl=1.0, progress=False)
    rec = trainer.fit(1)[0]
    assert not rec["skipped"] and math.isfinite(rec["kl"])
    assert rec["n_nonfinite"] > 0 and trainer.n_nonfinite_samples == rec["n_nonfinite"]
    strict = Trainer(bg, kl_batch_size=256, w_ml=0, w_kl=1, drop_nonfinite=False, progress=False)
    assert strict.fit(1)[0]["skipped"]


def test_gradient_clipping_bounds_the_update():
    bg = make_bg()
    trainer = Trainer(bg, lr=1.0, batch_size=64, clip_grad_norm=1e-3, progress=False)
    trainer.optimizer = torch.optim.SGD(bg.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in bg.parameters()])
    rec = trainer.fit(1, data=data() * 50)[0]
    after = torch.cat([p.detach().flatten() for p in bg.parameters()])
    assert rec["grad_norm"] > 1e-3  # the raw norm is logged
    assert float((after - before).norm()) <= 1e-3 * (1 + 1e-6)


def test_bad_data_and_settings_are_clear_errors():
    bg = make_bg()
    trainer = Trainer(bg, progress=False)
    bad = data()
    bad[7, 1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        trainer.fit(1, data=bad)
    with pytest.raises(ValueError, match="needs data"):
        trainer.fit(1)
    with pytest.raises(ValueError, match="shape"):
        trainer.fit(1, data=torch.zeros(10))
    with pytest.raises(ValueError, match="features"):
        trainer.fit(1, data=torch.zeros(10, 3))
    with pytest.raises(ValueError):
        trainer.fit(1, data=data(), w_ml=0.0, w_kl=0.0)
    with pytest.raises(ValueError, match="energy"):
        Trainer(BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1)), progress=False).fit(
            1, w_ml=0, w_kl=1
        )
    with pytest.raises(ValueError):
        Trainer(bg, lr=-1.0)


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor back to the host (a GPU would wait for them)."""

    NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.split(".")[0] in self.NAMES
        return func(*args, **(kwargs or {}))


class _Fn(Energy):
    def __init__(self, fn) -> None:
        super().__init__(2)
        self.fn = fn

    def _energy(self, x):
        return self.fn(x)


def _mixed_trainer(energy, sync_every=1, seed=0, **kw):
    torch.manual_seed(seed)
    bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 2, hidden=(16, 16)), energy)
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.8)  # noqa: E731
    kw = dict(batch_size=32, kl_batch_size=64, w_ml=1.0, w_kl=1.0, ema_decay=0.9, **kw)
    return Trainer(
        bg, clip_grad_norm=5.0, scheduler=sched, sync_every=sync_every, progress=False, **kw
    )


def test_steps_read_nothing_back_from_the_device():
    """Between record read-backs a step dispatches no op that reads a value to the host:
    losses, counts, ESS and the skip decision stay tensors (on a GPU nothing waits)."""
    with _HostReads() as probe:  # the probe sees a host read
        float(torch.ones(()) * 2)
    assert probe.n == 1

    def partly_inf(x):  # some infinite energies: counted and dropped on the device
        u = shifted_gaussian(x)
        return torch.where(x[:, 0] > 1.0, torch.full_like(u, math.inf), u)

    trainer = _mixed_trainer(LinLogCut(_Fn(partly_inf), high=50.0), sync_every=16)
    trainer.fit(1, data=data())  # the data check reads once per fit call
    with _HostReads() as probe:
        hist = trainer.fit(16, data=data())
    assert probe.n == 1  # the data check, not the 16 steps
    assert len(hist) == 16 and sum(r["n_nonfinite"] for r in hist) > 0
    assert all(isinstance(r["loss"], float) and isinstance(r["skipped"], bool) for r in hist)

    annealed = _mixed_trainer(shifted_gaussian, sync_every=8, buffer_size=256, resample_every=100)
    annealed.fit(1, w_ml=0.0, w_kl=0.0, w_iw=1.0, temperature=2.0)  # fills the buffer
    with _HostReads() as probe:
        annealed.fit(8, w_ml=0.0, w_kl=0.0, w_iw=1.0, temperature=2.0)
    assert probe.n == 0


def test_sync_every_changes_nothing_but_when_records_arrive():
    """Skipped steps, ESS checks, EMA, schedule and callbacks give the same run whether
    the records are read every step or every 5."""
    calls = {"n": 0}

    def flaky(x):  # every 5th call a NaN batch: a skipped step (or a NaN ESS estimate)
        calls["n"] += 1
        u = shifted_gaussian(x)
        return torch.full_like(u, math.nan) if calls["n"] % 5 == 0 else u

    runs = []
    for k in (1, 5):
        calls["n"] = 0
        seen = []
        callback = lambda t, r, seen=seen: seen.append((r["step"], t.n_skipped))  # noqa: E731
        tr = _mixed_trainer(flaky, sync_every=k, ess_every=6, ess_samples=64, callbacks=[callback])
        hist = tr.fit(23, data=data(), w_kl=1.0)
        params = torch.cat([p.detach().flatten() for p in tr.generator.parameters()])
        runs.append((hist, params, tr.n_skipped, seen, tr.optimizer.param_groups[0]["lr"]))
    (h1, p1, s1, c1, lr1), (h5, p5, s5, c5, lr5) = runs
    assert s1 == s5 > 0 and c1 == c5 and [st for st, _ in c1] == list(range(1, 24))
    keys = ("loss", "kl", "nll", "ess", "skipped", "grad_norm", "ess_eval", "lr")
    for a, b in zip(h1, h5, strict=True):
        for key in keys:
            if key in a or key in b:
                assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
    assert torch.equal(p1, p5) and lr1 == lr5


@pytest.mark.parametrize("compiled", [False, True])
def test_ml_and_weighted_ml_batches_share_one_flow_pass(compiled):
    """The data batch and the importance-buffer batch go through the flow together (one
    ``log_prob`` call per step), with the values separate passes give; a compiled flow
    keeps two passes of the batch size it was compiled for."""
    from bgflow_mini.flows import compile_flow
    from bgflow_mini.losses import nll

    torch.manual_seed(0)
    flow = coupling_flow(2, 2, hidden=(16, 16), kind="rnvp")
    bg = BoltzmannGenerator(StandardNormal(2), flow, shifted_gaussian).double()
    if compiled:
        compile_flow(bg.flow, backend="eager")
    x = data().double()
    trainer = Trainer(bg, lr=1e-3, batch_size=64, buffer_size=256, progress=False)
    trainer.fit(1, data=x, w_ml=1.0, w_iw=0.5)  # fills the buffer (step 0)
    rng = trainer.draws.batch_rng
    state = rng.get_state()
    with torch.no_grad():  # the draws of step 1, one pass each
        want_iw = float(nll(bg, trainer.draws.buffer_batch(trainer.buffer, 64, trainer.step)))
        want_ml = float(nll(bg, trainer.draws.data_batch(x, 64, trainer.step)))
    rng.set_state(state)
    calls = []
    plain = bg.log_prob
    bg.log_prob = lambda y: calls.append(len(y)) or plain(y)
    rec = trainer.fit(1, data=x, w_ml=1.0, w_iw=0.5)[0]
    assert calls == ([64, 64] if compiled else [128])  # buffer and data rows
    assert rec["nll_iw"] == pytest.approx(want_iw, rel=1e-12, abs=1e-12)
    assert rec["nll"] == pytest.approx(want_ml, rel=1e-12, abs=1e-12)
    assert rec["loss"] == pytest.approx(0.5 * want_iw + want_ml, rel=1e-12, abs=1e-12)
    assert want_iw != pytest.approx(want_ml)  # two different batches


def _spy_draws(trainer: Trainer) -> list:
    """The data weights' cdf (None: uniform) that each of ``trainer``'s steps draws with."""
    seen, step = [], trainer._train_step

    def spy(rows_cdf, *args):
        seen.append(rows_cdf[1])
        return step(rows_cdf, *args)

    trainer._train_step = spy
    return seen


def test_phases_draw_with_their_own_replica_weights():
    """A mapping of data weights: each phase draws with the set its replica_weights names."""
    rows = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    own = torch.cat([torch.ones(32), torch.zeros(32)])
    mbar = torch.cat([torch.zeros(32), torch.full((32,), 3.0)])
    phases = [Phase(steps=2, name="a"), Phase(steps=3, name="b", replica_weights="mbar")]
    trainer = Trainer(make_bg(), batch_size=16, progress=False)
    seen = _spy_draws(trainer)
    trainer.fit_phases(phases, data=rows, data_weights={None: own, "mbar": mbar})
    assert len(seen) == 5
    for cdf, w in zip(seen, [own] * 2 + [mbar] * 3):
        torch.testing.assert_close(cdf, torch.cumsum(w.double(), 0) / w.sum())
    trainer = Trainer(make_bg(), batch_size=16, progress=False)
    seen = _spy_draws(trainer)  # None as a value: uniform draws in that phase
    trainer.fit_phases(phases, data=rows, data_weights={None: None, "mbar": mbar})
    assert seen[0] is None and seen[1] is None and seen[2] is not None

    fresh = Trainer(make_bg(), batch_size=16, progress=False)
    with pytest.raises(ValueError, match=r"replica weightings \['mbar'\].*one set"):
        fresh.fit_phases(phases, data=rows, data_weights=own)
    with pytest.raises(ValueError, match=r"replica_weights \['mbar'\]"):
        fresh.fit_phases(phases, data=rows, data_weights={None: own})
    with pytest.raises(ValueError, match="non-negative"):  # the later phase's set, at once
        fresh.fit_phases(phases, data=rows, data_weights={None: own, "mbar": -mbar})
    assert fresh.step == 0 and not fresh.history


def test_data_weights_choose_which_rows_are_fitted():
    """Weighted rows: the ML fit follows the weights (zero-weight rows are ignored)."""
    g = torch.Generator().manual_seed(3)
    good = torch.randn(256, 2, generator=g) + 1.0
    far = torch.randn(256, 2, generator=g) - 5.0
    rows = torch.cat([good, far])
    weights = torch.cat([torch.ones(256), torch.zeros(256)])
    fit = {}
    for name, w in (("weighted", weights), ("uniform", None)):
        bg = make_bg(seed=0)
        Trainer(bg, lr=1e-2, batch_size=128, progress=False).fit(
            200, data=rows, w_ml=1.0, data_weights=w
        )
        with torch.no_grad():
            fit[name] = (bg.sample(4000).mean(0), bg.log_prob(good).mean())
    # the best possible mean log density of N(1, I) samples is -(1 + ln 2 pi) = -2.84
    assert torch.all((fit["weighted"][0] - 1.0).abs() < 0.3)
    assert fit["weighted"][1] > -2.95
    assert torch.all(fit["uniform"][0] < -0.5)  # the pooled rows' mean is -2
    assert fit["uniform"][1] < -3.3  # half the mass spent on the far rows: about -2.84 - ln 2
    trainer = Trainer(make_bg(), progress=False)
    with pytest.raises(ValueError, match="512 data rows"):
        trainer.fit(1, data=rows, data_weights=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        trainer.fit(1, data=rows, data_weights=-weights)
    with pytest.raises(ValueError, match="non-negative"):
        trainer.fit(1, data=rows, data_weights=torch.zeros(512))
