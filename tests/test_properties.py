"""Property-based tests (hypothesis): flow invertibility and exact log-dets, internal
coordinates round trips, and invariances of the reweighting estimators. float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bgflow_mini.coordinates import InternalCoordinates, build_zmatrix
from bgflow_mini.flows import coupling_flow
from bgflow_mini.reweighting import effective_sample_size, free_energy_difference
from bgflow_mini.systems import load_system
from bgflow_mini.units import wrap_angle

DT = torch.float64
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------- coupling flows


@st.composite
def flow_cases(draw) -> dict:
    """A tiny coupling flow with random dim, circular mask, kind, bins, seed and a scale
    for the noise added to every parameter (fresh conditioners are the identity)."""
    dim = draw(st.integers(2, 6))
    kind = draw(st.sampled_from(["rnvp", "nice", "spline"]))
    return {
        "dim": dim,
        "circular": draw(st.lists(st.booleans(), min_size=dim, max_size=dim)),
        "kind": kind,
        "n_blocks": draw(st.integers(1, 2)),
        "n_bins": draw(st.integers(2 if kind == "spline" else 1, 6)),
        "seed": draw(SEEDS),
        "noise": draw(st.floats(0.05, 0.3)),
    }


def _build(case: dict):
    flow = coupling_flow(
        case["dim"],
        case["n_blocks"],
        hidden=(8,),
        kind=case["kind"],
        circular=case["circular"],
        n_bins=case["n_bins"],
        seed=case["seed"],
    ).to(DT)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(case["noise"] * torch.randn(p.shape, generator=gen, dtype=DT))
    circ = torch.tensor(case["circular"], dtype=torch.bool)
    n = 16
    z = torch.randn(n, case["dim"], generator=gen, dtype=DT)
    u = (2 * torch.rand(n, case["dim"], generator=gen, dtype=DT) - 1) * math.pi
    z = torch.where(circ, u, z)  # circular features uniform on [-pi, pi)
    return flow, circ, z


def _diff(a: torch.Tensor, b: torch.Tensor, circ: torch.Tensor) -> torch.Tensor:
    """|a - b|, measured on the circle for circular features."""
    d = a - b
    return torch.where(circ, wrap_angle(d), d).abs()


@FAST
@given(flow_cases())
def test_coupling_flow_roundtrip_and_logdets(case: dict) -> None:
    flow, circ, z = _build(case)
    with torch.no_grad():
        x, ld_fwd = flow(z)
        z2, ld_inv = flow.inverse(x)
    assert x.shape == z.shape and ld_fwd.shape == ld_inv.shape == (z.shape[0],)
    assert torch.isfinite(x).all() and torch.isfinite(ld_fwd).all()
    if circ.any():  # angles stay on [-pi, pi)
        assert x[:, circ].min() >= -math.pi and x[:, circ].max() < math.pi
    assert _diff(z2, z, circ).max() < 1e-8
    torch.testing.assert_close(ld_inv, -ld_fwd, atol=1e-9, rtol=0)
    if case["kind"] == "nice":  # additive couplings + diagonal scaling: a constant log-det
        assert (ld_fwd - ld_fwd[0]).abs().max() < 1e-12
    elif case["noise"] > 0.1:  # a perturbed RealNVP or spline flow changes volume
        assert ld_fwd.abs().max() > 1e-6


@FAST
@given(flow_cases(), st.integers(0, 15))
def test_coupling_flow_logdet_matches_autograd_jacobian(case: dict, k: int) -> None:
    flow, circ, z = _build(case)
    zk = z[k]
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], zk)
    sign, ref = torch.linalg.slogdet(jac)
    assert sign != 0
    _, ld = flow(zk[None])
    assert abs(ld.item() - ref.item()) < 1e-8 * max(1.0, abs(ref.item()))
    # and the inverse direction at the image point
    xk = flow(zk[None])[0][0].detach()
    jac_inv = torch.autograd.functional.jacobian(lambda v: flow.inverse(v[None])[0][0], xk)
    _, ref_inv = torch.linalg.slogdet(jac_inv)
    assert abs(flow.inverse(xk[None])[1].item() - ref_inv.item()) < 1e-8 * max(
        1.0, abs(ref_inv.item())
    )


# ---------------------------------------------------------------- internal coordinates


@pytest.fixture(scope="module")
def aldp():
    s = load_system("aldp_vacuum")
    pos = np.asarray(s.positions, dtype=np.float64)
    ic = InternalCoordinates(build_zmatrix(s.mdtraj_topology, positions=s.positions)).to(DT)
    return ic, pos


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)  # proper rotation


def _distances(x: torch.Tensor) -> torch.Tensor:
    xyz = x.reshape(x.shape[0], -1, 3)
    return torch.cdist(xyz, xyz)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noise=st.floats(0.0, 0.01), seed=SEEDS)
def test_internal_coordinates_roundtrip_distances(aldp, noise: float, seed: int) -> None:
    """Cartesian -> IC -> Cartesian keeps every interatomic distance (the IC map drops the
    rigid-body motion, which is randomised here too); the log-dets are negatives."""
    ic, pos = aldp
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(4):
        xyz = pos + noise * rng.normal(size=pos.shape)
        xyz = xyz @ _random_rotation(rng).T + rng.normal(scale=2.0, size=3)
        frames.append(xyz.reshape(-1))
    x = torch.as_tensor(np.stack(frames), dtype=DT)
    q, ld_inv = ic.inverse(x)
    assert q.shape == (4, ic.dim) and torch.isfinite(q).all()
    x2, ld_fwd = ic(q)
    err = (_distances(x2) - _distances(x)).abs().max().item()
    assert err < 1e-8, f"distance error {err:.3g} nm"
    torch.testing.assert_close(ld_fwd, -ld_inv, atol=1e-10, rtol=0)
    q2, ld_inv2 = ic.inverse(x2)  # the rebuilt frame has the same ICs
    torch.testing.assert_close(ld_inv2, ld_inv, atol=1e-9, rtol=0)
    d = torch.where(ic.circular, wrap_angle(q2 - q), q2 - q).abs().max().item()
    assert d < 1e-8


# ---------------------------------------------------------------- reweighting

LOG_W = hnp.arrays(
    np.float64,
    st.integers(1, 200),
    elements=st.floats(-1000.0, 1000.0, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=50, deadline=None)
@given(LOG_W, st.floats(-1e3, 1e3), SEEDS)
def test_ess_bounds_and_invariances(log_w: np.ndarray, shift: float, seed: int) -> None:
    ess = effective_sample_size(log_w)
    assert 0.0 < ess <= 1.0
    assert ess >= 1.0 / len(log_w) * (1 - 1e-12)  # Kish ESS is at least one sample
    assert math.isclose(effective_sample_size(log_w + shift), ess, rel_tol=1e-9)
    perm = np.random.default_rng(seed).permutation(len(log_w))
    assert math.isclose(effective_sample_size(log_w[perm]), ess, rel_tol=1e-12)


@settings(max_examples=30, deadline=None)
@given(LOG_W, st.integers(1, 50))
def test_ess_zero_weights_count_as_samples(log_w: np.ndarray, n_zero: int) -> None:
    """-inf entries are samples with zero weight: appending k of them scales ESS/N by
    N / (N + k)."""
    n = len(log_w)
    padded = np.concatenate([log_w, np.full(n_zero, -np.inf)])
    got = effective_sample_size(padded)
    assert math.isclose(got, effective_sample_size(log_w) * n / (n + n_zero), rel_tol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 500), st.floats(-1e3, 1e3))
def test_ess_equal_weights_is_one(n: int, value: float) -> None:
    assert math.isclose(effective_sample_size(np.full(n, value)), 1.0, rel_tol=1e-12)


@st.composite
def state_labels(draw) -> np.ndarray:
    """Labels 0 (A), 1 (B), 2 (neither), with A and B both non-empty."""
    labels = draw(hnp.arrays(np.int64, st.integers(2, 300), elements=st.integers(0, 2)))
    i, j = draw(st.lists(st.integers(0, len(labels) - 1), min_size=2, max_size=2, unique=True))
    labels[i], labels[j] = 0, 1
    return labels


@settings(max_examples=50, deadline=None)
@given(state_labels())
def test_free_energy_difference_unit_weights_is_count_ratio(labels: np.ndarray) -> None:
    a, b = labels == 0, labels == 1
    expected = -math.log(b.sum() / a.sum())
    df, err = free_energy_difference(None, a, b, n_bootstrap=0)
    assert math.isclose(df, expected, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isnan(err)
    df0, _ = free_energy_difference(np.zeros(len(labels)), a, b, n_bootstrap=0)
    assert math.isclose(df0, expected, rel_tol=1e-12, abs_tol=1e-12)
    # swapping the states flips the sign
    df_ba, _ = free_energy_difference(None, b, a, n_bootstrap=0)
    assert math.isclose(df_ba, -df, rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(state_labels(), st.floats(-1e3, 1e3), SEEDS, st.floats(0.1, 30.0))
def test_free_energy_difference_shift_invariant(
    labels: np.ndarray, shift: float, seed: int, spread: float
) -> None:
    a, b = labels == 0, labels == 1
    log_w = spread * np.random.default_rng(seed).normal(size=len(labels))
    df, err = free_energy_difference(log_w, a, b, n_bootstrap=20, seed=seed)
    df2, err2 = free_energy_difference(log_w + shift, a, b, n_bootstrap=20, seed=seed)
    tol = 1e-9 * (1 + abs(shift) + spread)
    assert abs(df2 - df) < tol
    # same seed -> same resamples: the bootstrap error is shift invariant too
    assert (math.isinf(err) and math.isinf(err2)) or abs(err2 - err) < tol
    assert err >= 0
