"""Optional torch.compile of flows: same numbers as eager, clean fallback (float64)."""

import warnings

import pytest
import torch

from bgflow_mini import BoltzmannGenerator, pipeline
from bgflow_mini.coordinates.normalization import ICTransform
from bgflow_mini.distributions import StandardNormal
from bgflow_mini.flows import compile_flow, compile_generator, coupling_flow, is_compiled
from bgflow_mini.systems import load_system

KINDS = ["rnvp", "nice"]


def _pair(kind: str, circular=None):
    """Two copies of one flow: ``(eager, to be compiled)``."""
    a = coupling_flow(6, 2, hidden=(16,), kind=kind, circular=circular, seed=0).double()
    b = coupling_flow(6, 2, hidden=(16,), kind=kind, circular=circular, seed=0).double()
    b.load_state_dict(a.state_dict())
    return a, b


class _Counting:
    """A torch.compile backend that runs the traced graph as is and counts compilations."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, gm, example_inputs):
        self.n += 1
        return gm.forward


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("circular", [None, [True, False, False, True, False, False]])
def test_compiled_flow_computes_the_eager_flow(kind, circular):
    eager, comp = _pair(kind, circular)
    backend = _Counting()
    compile_flow(comp, backend=backend)
    assert is_compiled(comp) and list(comp.state_dict()) == list(eager.state_dict())
    torch.manual_seed(0)
    z = torch.rand(32, 6, dtype=torch.float64) * 2 - 1  # inside the circular domain
    for n in (32, 17):  # a second batch size: a dynamic batch dimension
        zn = z[:n]
        x0, ld0 = eager(zn)
        x1, ld1 = comp(zn)
        torch.testing.assert_close(x1, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(ld1, ld0, rtol=0, atol=1e-12)
        z1, li1 = comp.inverse(x1)
        torch.testing.assert_close(z1, zn, rtol=0, atol=1e-9)
        torch.testing.assert_close(li1, -ld1, rtol=0, atol=1e-9)
    assert backend.n >= 2  # forward and inverse went through the compiler
    (x0.sum() + ld0.sum()).backward()
    (x1.sum() + ld1.sum()).backward()
    for p, q in zip(eager.parameters(), comp.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-10)


def test_calls_without_gradients_run_eagerly():
    _, comp = _pair("rnvp")
    backend = _Counting()
    compile_flow(comp, backend=backend)
    with torch.no_grad():
        comp(torch.zeros(4, 6, dtype=torch.float64))
        comp.inverse(torch.zeros(4, 6, dtype=torch.float64))
    assert backend.n == 0
    comp(torch.zeros(4, 6, dtype=torch.float64))
    assert backend.n == 1


def test_a_failing_compilation_falls_back_to_eager_with_one_warning():
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    eager, comp = _pair("rnvp")
    compile_flow(comp, backend=broken)
    z = torch.randn(8, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="running it without compilation"):
        x, ld = comp(z)
    torch.testing.assert_close(x, eager(z)[0], rtol=0, atol=0)
    assert not is_compiled(comp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        comp(z)
    with pytest.raises(ValueError, match="features"):  # the flow's own errors still raise
        comp(torch.randn(8, 5, dtype=torch.float64))


def test_compile_generator_leaves_the_internal_coordinates_eager():
    system = load_system("aldp_vacuum")
    pos = torch.as_tensor(system.positions, dtype=torch.float64).reshape(1, -1)
    train = pos + 0.003 * torch.randn(64, pos.shape[1], dtype=torch.float64)
    factory = lambda dim, circular: coupling_flow(  # noqa: E731
        dim, 1, hidden=(16,), circular=circular, seed=0
    )
    gen = pipeline.molecular_generator(system, train, factory)
    chosen = compile_generator(gen, backend="aot_eager")
    assert chosen == [gen.flow.flows[0]] and is_compiled(gen.flow.flows[0])
    assert not any(is_compiled(m) for m in gen.modules() if isinstance(m, ICTransform))
    toy = BoltzmannGenerator(StandardNormal(6), coupling_flow(6, 1))
    assert compile_generator(toy, backend="aot_eager") == [toy.flow]


@pytest.mark.slow
def test_inductor_compiles_a_coupling_flow_to_the_eager_numbers():
    """The real backend (needs a C++ compiler; else the fallback warns and this fails)."""
    eager, comp = _pair("rnvp", [True, False, False, True, False, False])
    compile_flow(comp)
    z = torch.rand(64, 6, dtype=torch.float64) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        x1, ld1 = comp(z)
    x0, ld0 = eager(z)
    assert is_compiled(comp)
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld1, ld0, rtol=0, atol=1e-10)
