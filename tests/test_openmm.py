"""Tests of ``OpenMMEnergy`` against direct single-Context OpenMM calls."""

from __future__ import annotations

import copy
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from bgflow_mini.energies import Energy, OpenMMEnergy, _openmm_pool
from bgflow_mini.energies.openmm import WorkerError, select_platform
from bgflow_mini.systems import load_system

VARIANTS = ["aldp_vacuum", "aldp_implicit"]
N_CONF = 24


@pytest.fixture(scope="module", params=VARIANTS)
def system(request):
    return load_system(request.param)


def _configs(system, n=N_CONF, scale=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return system.positions[None] + scale * rng.normal(size=(n, system.n_atoms, 3))


def _direct(system, x):
    """Energies (kJ/mol) and forces (kJ/mol/nm) from one plain Reference Context."""
    ctx = openmm.Context(
        system.system,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    e, f = [], []
    for xi in x:
        ctx.setPositions(xi * unit.nanometer)
        st = ctx.getState(getEnergy=True, getForces=True)
        e.append(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        f.append(st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(e), np.array(f)


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda n: f"workers{n}")
def energy(request, system):
    en = OpenMMEnergy(system, n_workers=request.param)
    yield en
    en.close()


def test_energy_and_gradient_match_openmm(system, energy):
    x = _configs(system)
    e_ref, f_ref = _direct(system, x)
    assert isinstance(energy, Energy) and energy.dim == 66
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        for layout in ("flat", "atoms"):
            xt = torch.tensor(x, dtype=dtype)
            if layout == "flat":
                xt = xt.reshape(N_CONF, 66)
            xt.requires_grad_(True)
            u = energy(xt)
            assert u.shape == (N_CONF,) and u.dtype == dtype
            (grad,) = torch.autograd.grad(u.sum(), xt)
            assert grad.shape == xt.shape and grad.dtype == dtype
            u_ref = e_ref / system.kT
            g_ref = -f_ref / system.kT
            # float32 inputs are rounded positions: compare against float64 reference loosely
            atol_u = 1e-9 if dtype == torch.float64 else 5e-2
            np.testing.assert_allclose(u.detach().double().numpy(), u_ref, rtol=tol, atol=atol_u)
            g = grad.double().numpy().reshape(N_CONF, 22, 3)
            if dtype == torch.float64:
                np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-9)
            else:
                scale = np.abs(g_ref).max()
                assert np.abs(g - g_ref).max() < 0.02 * scale
    if energy.n_workers:
        assert len(energy.worker_pids) == energy.n_workers


def test_float32_exact_against_rounded_positions(system, energy):
    x32 = torch.tensor(_configs(system, n=8, seed=3), dtype=torch.float32, requires_grad=True)
    e_ref, f_ref = _direct(system, x32.detach().double().numpy())
    u = energy(x32)
    (g,) = torch.autograd.grad(u.sum(), x32)
    np.testing.assert_allclose(u.detach().numpy(), (e_ref / system.kT).astype(np.float32))
    np.testing.assert_allclose(g.numpy(), (-f_ref / system.kT).astype(np.float32), rtol=1e-6)


def test_no_grad_path(system, energy):
    x = _configs(system, n=5, seed=4)
    e_ref, _ = _direct(system, x)
    with torch.no_grad():
        u = energy(torch.tensor(x, requires_grad=True))
    assert not u.requires_grad
    np.testing.assert_allclose(u.numpy(), e_ref / system.kT, rtol=1e-10)


def test_nonfinite_inputs_and_failures(system, energy):
    x = _configs(system, n=6, seed=5)
    x[1, 3, 0] = np.nan
    x[2, 0, 2] = np.inf
    x[4, 1] = x[4, 0]  # two bonded atoms on top of each other: OpenMM returns NaN
    energy.reset_stats()
    xt = torch.tensor(x, requires_grad=True)
    u = energy(xt)
    (g,) = torch.autograd.grad(u.sum(), xt)
    bad = [1, 2, 4]
    assert torch.isinf(u[bad]).all() and (u[bad] > 0).all()
    assert torch.isfinite(u[[0, 3, 5]]).all()
    assert torch.isfinite(g).all() and (g[bad] == 0).all()
    assert (g[[0, 3, 5]] != 0).any(dim=(1, 2)).all()
    want = {"calls": 1, "evaluated": 3, "nonfinite_input": 2, "openmm_failed": 1}
    assert energy.last_stats == want and energy.stats == want
    energy(xt.detach())
    assert energy.stats["nonfinite_input"] == 4 and energy.stats["calls"] == 2
    assert energy.reset_stats()["evaluated"] == 6 and energy.stats["evaluated"] == 0


def test_high_energy_and_all_nonfinite(system):
    en = OpenMMEnergy(system, n_workers=0, high_energy=1e6)
    x = torch.full((3, 66), float("nan"), requires_grad=True)
    u = en(x)
    assert torch.equal(u, torch.full((3,), 1e6))
    (g,) = torch.autograd.grad(u.sum(), x)
    assert torch.equal(g, torch.zeros_like(g))
    assert en.stats["nonfinite_input"] == 3 and en.stats["evaluated"] == 0


def test_evaluate_marks_configurations_openmm_raises_on():
    class FlakyContext:
        def __init__(self, ctx):
            self.ctx, self.n = ctx, 0

        def setPositions(self, x):  # noqa: N802 - OpenMM API name
            self.n += 1
            if self.n == 2:
                raise openmm.OpenMMException("Particle coordinate is NaN")
            self.ctx.setPositions(x)

        def getState(self, **kw):  # noqa: N802
            return self.ctx.getState(**kw)

    s = load_system("aldp_vacuum")
    xml = openmm.XmlSerializer.serialize(s.system)
    ctx = FlakyContext(_openmm_pool.make_context(xml, "Reference", {}))
    x = _configs(s, n=3)
    e, f, failed = _openmm_pool.evaluate(ctx, x, True)
    assert failed.tolist() == [False, True, False]
    assert np.isnan(e[1]) and (f[1] == 0).all() and np.isfinite(e[[0, 2]]).all()


def test_wrong_shapes(energy):
    for shape in [(4, 65), (4, 21, 3), (4, 22, 2), (66,), (2, 3, 22, 3)]:
        with pytest.raises(ValueError, match=r"expects x of shape \(batch, 22, 3\)|\(batch, 66\)"):
            energy(torch.zeros(shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="got \\(4, 65\\)"):
        energy(torch.zeros(4, 65))
    with pytest.raises(ValueError, match="floating point"):
        energy(torch.zeros(4, 66, dtype=torch.int64))


def test_empty_batch(energy):
    u = energy(torch.zeros(0, 66))
    assert u.shape == (0,)


def test_pool_reused_and_restarted(system):
    x = torch.tensor(_configs(system, n=10))
    with OpenMMEnergy(system, n_workers=2, chunk_size=3) as en:
        assert en.worker_pids == []  # lazy start
        u1 = en(x)
        pids = en.worker_pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
        u2 = en(x)
        assert en.worker_pids == pids
        torch.testing.assert_close(u1, u2, rtol=0, atol=0)
        e_ref, _ = _direct(system, x.numpy())
        np.testing.assert_allclose(u1.numpy(), e_ref / system.kT, rtol=1e-10)
        en.close()
        assert en.worker_pids == []
        for pid in pids:  # closed workers are gone (joined)
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        torch.testing.assert_close(en(x), u1, rtol=0, atol=0)  # restarts
        assert en.worker_pids and en.worker_pids != pids
    assert en.worker_pids == []


def test_dead_worker_raises_then_recovers():
    s = load_system("aldp_vacuum")
    x = torch.tensor(_configs(s, n=4))
    with OpenMMEnergy(s, n_workers=2) as en:
        u = en(x)
        os.kill(en.worker_pids[0], signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(WorkerError, match="died"):
            en(x)
        assert en.worker_pids == []
        torch.testing.assert_close(en(x), u)


def test_bad_platform_and_arguments():
    s = load_system("aldp_vacuum")
    with pytest.raises(ValueError, match="platform must be one of"):
        OpenMMEnergy(s, platform="Metal")
    with pytest.raises(ValueError, match="temperature"):
        OpenMMEnergy(s.system)
    with pytest.raises(ValueError, match="n_workers"):
        OpenMMEnergy(s, n_workers=-1)
    assert select_platform(s.system, "auto") in ("CUDA", "OpenCL", "CPU", "Reference")


def test_auto_platform_logs_why_platforms_were_skipped(monkeypatch, caplog):
    import logging

    import openmm

    from bgflow_mini.energies import openmm as omm

    s = load_system("aldp_vacuum")
    real = openmm.Context

    def context(system, integrator, platform):
        if platform.getName() != "Reference":
            raise openmm.OpenMMException(f"no device for {platform.getName()}\nmore detail")
        return real(system, integrator, platform)

    monkeypatch.setattr(omm.openmm, "Context", context)
    with caplog.at_level(logging.INFO, logger="bgflow_mini.energies.openmm"):
        assert select_platform(s.system, "auto") == "Reference"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    others = openmm.Platform.getNumPlatforms() - 1
    assert len(skipped) == others
    assert all("OpenMMException: no device for" in m and "more detail" not in m for m in skipped)

    def broken(system, integrator, platform):
        raise openmm.OpenMMException(f"broken {platform.getName()}")

    monkeypatch.setattr(omm.openmm, "Context", broken)
    with pytest.raises(
        RuntimeError, match="no OpenMM platform.*Reference \\(OpenMMException: broken"
    ):
        select_platform(s.system, "auto")


def test_openmm_system_input_and_copy():
    s = load_system("aldp_vacuum")
    en = OpenMMEnergy(s.system, temperature=600.0, n_workers=0)
    x = _configs(s, n=3)
    e_ref, _ = _direct(s, x)
    np.testing.assert_allclose(en(torch.tensor(x)).numpy(), e_ref / (2 * s.kT), rtol=1e-10)
    en2 = copy.deepcopy(en)
    assert en2._context is None
    np.testing.assert_allclose(en2(torch.tensor(x)).numpy(), e_ref / (2 * s.kT), rtol=1e-10)


def test_cpu_platform_two_workers():
    s = load_system("aldp_implicit")
    x = _configs(s, n=6)
    e_ref, f_ref = _direct(s, x)
    with OpenMMEnergy(s, platform="CPU", n_workers=2) as en:
        assert en.platform_properties == {"Threads": "1"}
        xt = torch.tensor(x, requires_grad=True)
        u = en(xt)
        (g,) = torch.autograd.grad(u.sum(), xt)
    # the CPU platform computes forces in single precision
    np.testing.assert_allclose(u.detach().numpy(), e_ref / s.kT, rtol=1e-5, atol=1e-3)
    assert np.abs(g.numpy() + f_ref / s.kT).max() < 1e-3 * np.abs(f_ref / s.kT).max()


def test_gradcheck_in_process():
    s = load_system("aldp_vacuum")
    en = OpenMMEnergy(s, n_workers=0)
    x = torch.tensor(_configs(s, n=2, seed=7), requires_grad=True)
    assert torch.autograd.gradcheck(en, (x,), eps=1e-6, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for tensors")
def test_cuda_tensors():
    s = load_system("aldp_vacuum")
    x = _configs(s, n=4)
    e_ref, f_ref = _direct(s, x)
    with OpenMMEnergy(s, n_workers=1) as en:
        xt = torch.tensor(x, device="cuda", requires_grad=True)
        u = en(xt)
        (g,) = torch.autograd.grad(u.sum(), xt)
    assert u.device.type == "cuda" and g.device.type == "cuda"
    np.testing.assert_allclose(u.cpu().detach().numpy(), e_ref / s.kT, rtol=1e-10)
    np.testing.assert_allclose(g.cpu().numpy(), -f_ref / s.kT, rtol=1e-9, atol=1e-9)


SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from bgflow_mini.systems import load_system
    from bgflow_mini.energies import OpenMMEnergy
    s = load_system("aldp_vacuum")
    en = OpenMMEnergy(s, n_workers=2)
    u = en(torch.tensor(s.positions).reshape(1, -1).repeat(4, 1))
    print(" ".join(map(str, en.worker_pids)), flush=True)
    {tail}
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_interpreter_exits_without_hanging():
    """No close(): normal exit and exit by an uncaught exception, run side by side."""
    tails = {"": 0, "raise RuntimeError('boom')": 1}
    procs = {
        tail: subprocess.Popen(
            [sys.executable, "-c", SCRIPT.format(tail=tail)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tail in tails
    }
    try:
        for tail, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == tails[tail], err
            pids = [int(p) for p in out.split()]
            assert len(pids) == 2
            assert _wait_gone(pids), "workers survived the interpreter"
            assert ("boom" in err) == bool(tail) and err.count("Traceback") == bool(tail), err
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_garbage_collection_stops_workers():
    s = load_system("aldp_vacuum")
    en = OpenMMEnergy(s, n_workers=1).start()
    pids = en.worker_pids
    assert _alive(pids[0])
    del en
    gc.collect()
    assert _wait_gone(pids)


def test_workers_exit_when_parent_is_killed():
    code = SCRIPT.format(tail="import time; time.sleep(60)")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(10)
        assert _wait_gone(pids), "workers survived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_one_worker_throughput_vs_plain_loop():
    """Batch 1024, aldp_vacuum, Reference: 1 worker >= 90 % of a plain Context loop (best of 5)."""
    s = load_system("aldp_vacuum")
    x = _configs(s, n=1024)
    ctx = openmm.Context(
        s.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )

    def loop():
        for xi in x:
            ctx.setPositions(xi)
            st = ctx.getState(getEnergy=True, getForces=True)
            st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)

    def best(fn):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    xt = torch.tensor(x, requires_grad=True)
    with OpenMMEnergy(s, n_workers=1).start() as en:
        t_loop = best(loop)
        t_pool = best(lambda: en._evaluate(xt.detach(), True))
    assert t_pool <= t_loop / 0.9, (1024 / t_loop, 1024 / t_pool)
