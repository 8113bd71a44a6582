"""Small neural networks used as coupling-layer conditioners."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

__all__ = ["MLP", "ACTIVATIONS", "activation_class"]

# activations by name, so a flow's constructor arguments are plain data (checkpoints)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
}


def activation_class(activation: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """An activation factory from a name in :data:`ACTIVATIONS` (case-insensitive) or a
    callable returning an ``nn.Module`` (returned unchanged)."""
    if isinstance(activation, str):
        key = activation.lower()
        if key not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        return ACTIVATIONS[key]
    if not callable(activation):
        raise ValueError(f"MLP activation must be callable (e.g. nn.SiLU), got {activation!r}")
    return activation


class MLP(nn.Module):
    """Fully connected network ``in_features -> hidden... -> out_features``.

    The last ``Linear`` layer is initialised to zero (weights and bias), so a fresh
    network outputs exactly 0 for every input; a coupling layer built on it starts
    as the identity map.

    Arguments:
        in_features: input width (>= 1).
        out_features: output width (>= 1).
        hidden: widths of the hidden layers (each >= 1); may be empty (a single
            linear layer).
        activation: a name of :data:`ACTIVATIONS` (e.g. ``"silu"``) or a callable
            returning an ``nn.Module`` (e.g. ``nn.SiLU``), instantiated once after each
            hidden layer.

    Input ``(batch, in_features)``, output ``(batch, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[], nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLP {name} must be a positive int, got {value!r}")
        if isinstance(hidden, int):
            hidden = (hidden,)
        hidden = tuple(hidden)
        for h in hidden:
            if isinstance(h, bool) or not isinstance(h, int) or h < 1:
                raise ValueError(f"MLP hidden widths must be positive ints, got {hidden!r}")
        activation = activation_class(activation)
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            act = activation()
            if not isinstance(act, nn.Module):
                raise ValueError(
                    f"MLP activation() must return an nn.Module, got {type(act).__name__}"
                )
            layers.append(act)
            width = h
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def last(self) -> nn.Linear:
        """The output ``Linear`` layer (zero at initialisation)."""
        return self.net[-1]

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP expects input of shape (batch, {self.in_features}), got {tuple(x.shape)}"
            )
        return self.net(x)
