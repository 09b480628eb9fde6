"""Losses, fused with the output activation in their stable forms (SPEC section 1), and the numpy reference.

    mse         L = (1/N) Σₙ ½‖F(Zₙ) − yₙ‖²                   δ = (A − y)/N ⊙ F'(Z)
    bce         L = mean over N·out of −[y log σ(z) + (1−y) log(1−σ(z))]
                  = mean of max(z, 0) − z·y + log(1 + e^−|z|)  δ = (σ(Z) − y)/(N·out)   (output sigmoid)
    softmax_ce  L = (1/N) Σₙ −Σₖ yₙₖ log softmax(Zₙ)ₖ          δ = (softmax(Z) − y)/N    (output identity)

Gradients are means over the batch, as PyTorch's reduction="mean". The seed's MSE (½(ŷ − y)²) is mse at N = 1.
"""
import numpy as np

from . import activations as acts

MSE, BCE, SOFTMAX_CE = 0, 1, 2
NAMES = {"mse": MSE, "bce": BCE, "softmax_ce": SOFTMAX_CE}
# The output activation each fused form needs (None: any).
REQUIRED_ACTIVATION = {MSE: None, BCE: acts.SIGMOID, SOFTMAX_CE: acts.IDENTITY}


def loss_id(name):
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"loss: expected one of {sorted(NAMES)}, got {name!r}")
    return NAMES[name]


def name_of(loss):
    return {v: k for k, v in NAMES.items()}[loss]


def loss_grad(loss, act, alpha, Z, y, A, delta):
    """The numpy reference of Backend.loss_grad: fills A = F(Z) and delta = ∂L/∂Z, returns L (a float)."""
    N, out = Z.shape
    if loss == MSE:
        acts.forward(act, Z, alpha, out=A)
        np.subtract(A, y, out=delta)
        value = 0.5 * float(np.sum(np.square(delta, dtype=np.float64))) / N
        delta /= N
        acts.derivative_mask(act, delta, Z, A, alpha, out=delta)
    elif loss == BCE:
        acts.forward(acts.SIGMOID, Z, alpha, out=A)
        z = Z.astype(np.float64, copy=False)
        value = float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
        np.subtract(A, y, out=delta)
        delta /= N * out
    elif loss == SOFTMAX_CE:
        shifted = Z - Z.max(axis=1, keepdims=True)           # shift by the row max: exp cannot overflow
        log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_sum
        np.exp(log_p, out=A)
        value = -float(np.sum(y * log_p, dtype=np.float64)) / N
        np.subtract(A, y, out=delta)
        delta /= N
    else:
        raise ValueError(f"unknown loss id {loss}")
    return value


def accuracy_applies(loss):
    return loss in (BCE, SOFTMAX_CE)


def accuracy(loss, A, Y):
    """The fraction of right answers, from predictions A and float targets Y (N, out), numpy; None for mse.
    bce: every output thresholded at 0.5; softmax_ce: the arg-max class."""
    if loss == BCE:
        return float(np.mean((A > 0.5) == (Y > 0.5)))
    if loss == SOFTMAX_CE:
        return float(np.mean(A.argmax(axis=1) == Y.argmax(axis=1)))
    return None
