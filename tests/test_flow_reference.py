"""Today's flows compute the same maps as before the speed work (issue 14).

``tests/data/flow_reference.pt`` holds outputs and log-dets of small RNVP / NICE coupling
stacks with circular features and of the proline dipeptide's internal-coordinate
transform, written by ``tests/data/make_flow_reference.py`` with the code as it was
before its kernels were rewritten. Loading the same parameters into today's layers must
give the same numbers to float64 tolerance (and old state dicts must still load).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bgflow_mini.coordinates import ic_transform
from bgflow_mini.coordinates.zmatrix import bond_graph
from bgflow_mini.flows import coupling_flow
from bgflow_mini.systems import load_system

REF = Path(__file__).parent / "data" / "flow_reference.pt"


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(REF, weights_only=True)


@pytest.mark.parametrize("kind", ["rnvp", "nice"])
def test_coupling_stack_matches_reference(ref, kind):
    r = ref["flows"][kind]
    flow = coupling_flow(12, 3, hidden=(16, 16), kind=kind, circular=[1, 4, 5, 8, 11], n_bins=6)
    flow = flow.double()
    flow.load_state_dict(r["state"])  # strict: the parameter names are unchanged
    x, ld = flow(r["input"])
    torch.testing.assert_close(x, r["forward"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, r["forward_logdet"], rtol=1e-10, atol=1e-10)
    z, ld = flow.inverse(r["input"])
    torch.testing.assert_close(z, r["inverse"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, r["inverse_logdet"], rtol=1e-10, atol=1e-10)


def test_internal_coordinates_match_reference(ref):
    r = ref["internal"]
    top = load_system("pro_dipeptide_vacuum").mdtraj_topology
    ic, _ = ic_transform(
        r["zmatrix"].numpy(),
        r["fit_positions"],
        cartesian=r["cartesian"].numpy(),
        bonds=bond_graph(top)[1],
    )
    latent, ld = ic.inverse(r["positions"])
    torch.testing.assert_close(latent, r["latent"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, r["inverse_logdet"], rtol=1e-10, atol=1e-10)
    x, ld = ic(r["perturbed_latent"])
    torch.testing.assert_close(x, r["forward"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, r["forward_logdet"], rtol=1e-10, atol=1e-10)
