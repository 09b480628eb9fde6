"""Activation functions: their names, the integer ids the kernels use, and the numpy reference.

    A = g(Z)        forward
    g'(Z)           what backward multiplies dA by:  δ = dA ⊙ g'(Z)

Each activation keeps its forward and its derivative side by side. The derivative is written in terms of
whichever of Z or A is cheaper and exact: relu/leaky_relu use Z (NOTE: the mask is taken from Z, not A, so
the gradient at Z = 0 is 0, as in the seed's ReLU), sigmoid and tanh use A.
"""
import numpy as np

IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH = 0, 1, 2, 3, 4

NAMES = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "sigmoid": SIGMOID, "tanh": TANH}
DEFAULT_ALPHA = 0.01  # leaky_relu's slope for Z <= 0, PyTorch's default


def activation_id(name):
    """The kernel id of an activation name; ValueError naming the choices for anything else."""
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"activation: expected one of {sorted(NAMES)}, got {name!r}")
    return NAMES[name]


def forward(act, Z, alpha=DEFAULT_ALPHA, out=None):
    """A = g(Z), written into `out` (may be Z itself)."""
    if out is None:
        out = np.empty_like(Z)
    if act == IDENTITY:
        out[...] = Z
    elif act == RELU:
        np.maximum(Z, 0, out=out)
    elif act == LEAKY_RELU:
        np.multiply(Z, np.where(Z > 0, Z.dtype.type(1), Z.dtype.type(alpha)), out=out)
    elif act == SIGMOID:
        # 1/(1+exp(-z)) overflows harmlessly to 0 for very negative z; silence the warning only.
        with np.errstate(over="ignore"):
            np.exp(-Z, out=out)
        out += 1
        np.reciprocal(out, out=out)
    elif act == TANH:
        np.tanh(Z, out=out)
    else:
        raise ValueError(f"unknown activation id {act}")
    return out


def derivative_mask(act, dA, Z, A, alpha=DEFAULT_ALPHA, out=None):
    """δ = dA ⊙ g'(Z), written into `out` (may be dA itself)."""
    if out is None:
        out = np.empty_like(dA)
    if act == IDENTITY:
        out[...] = dA
    elif act == RELU:
        np.multiply(dA, Z > 0, out=out)
    elif act == LEAKY_RELU:
        np.multiply(dA, np.where(Z > 0, Z.dtype.type(1), Z.dtype.type(alpha)), out=out)
    elif act == SIGMOID:
        np.multiply(dA, A * (1 - A), out=out)  # σ' = σ(1 − σ)
    elif act == TANH:
        np.multiply(dA, 1 - A * A, out=out)    # tanh' = 1 − tanh²
    else:
        raise ValueError(f"unknown activation id {act}")
    return out
