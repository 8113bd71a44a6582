"""Write ``flow_reference.pt``: outputs of the flows as they were before the speed work.

Run once, at commit ad87fb5 (before issue 14 rewrote the coupling, spline and
internal-coordinate kernels), with ``python tests/data/make_flow_reference.py``. The
file holds, in float64, the state dicts of small RNVP and NICE coupling stacks with
circular features (parameters randomised), inputs in both directions and the outputs
and log-dets that code produced, and the same for the internal-coordinate transform of
the shipped proline dipeptide (ring atoms as Cartesian rows) fitted to jittered
positions. ``tests/test_flow_reference.py`` checks that today's code gives the same
numbers to float tolerance: the faster kernels compute the same maps.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bgflow_mini.coordinates import build_zmatrix, ic_transform, ring_zmatrix
from bgflow_mini.coordinates.zmatrix import bond_graph
from bgflow_mini.flows import coupling_flow
from bgflow_mini.systems import load_system

DIM, CIRC, N = 12, [1, 4, 5, 8, 11], 64


def flows() -> dict:
    out = {}
    for kind in ("rnvp", "nice"):
        torch.manual_seed(0)
        flow = coupling_flow(DIM, 3, hidden=(16, 16), kind=kind, circular=CIRC, n_bins=6)
        flow = flow.double()
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.3 * torch.randn_like(p))
        g = torch.Generator().manual_seed(1)
        z = 1.2 * torch.randn(N, DIM, generator=g, dtype=torch.float64)
        z[:, CIRC] = (2 * torch.rand(N, len(CIRC), generator=g, dtype=torch.float64) - 1) * math.pi
        x, ld_f = flow(z)
        z_back, ld_i = flow.inverse(z)  # the inverse of the same inputs
        out[kind] = {
            "state": flow.state_dict(),
            "input": z,
            "forward": x.detach(),
            "forward_logdet": ld_f.detach(),
            "inverse": z_back.detach(),
            "inverse_logdet": ld_i.detach(),
        }
    return out


def internal() -> dict:
    system = load_system("pro_dipeptide_vacuum")
    top = system.mdtraj_topology
    pos = torch.as_tensor(system.positions, dtype=torch.float64).reshape(1, -1)
    g = torch.Generator().manual_seed(2)
    data = pos + 0.01 * torch.randn(200, pos.shape[1], generator=g, dtype=torch.float64)
    z, cart = ring_zmatrix(build_zmatrix(top, positions=system.positions), top, system.positions)
    ic, circular = ic_transform(z, data, cartesian=cart, bonds=bond_graph(top)[1])
    latent, ld_i = ic.inverse(data[:N])
    g = torch.Generator().manual_seed(3)
    lat = latent + 0.05 * torch.randn(latent.shape, generator=g, dtype=torch.float64)
    x, ld_f = ic(lat)
    return {
        "zmatrix": torch.as_tensor(z),
        "cartesian": torch.as_tensor(cart),
        "fit_positions": data,
        "positions": data[:N],
        "latent": latent.detach(),
        "inverse_logdet": ld_i.detach(),
        "perturbed_latent": lat,
        "forward": x.detach(),
        "forward_logdet": ld_f.detach(),
    }


if __name__ == "__main__":
    ref = {"flows": flows(), "internal": internal()}
    path = Path(__file__).with_name("flow_reference.pt")
    torch.save(ref, path)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
