"""Backpropagation against central finite differences in float64 (numpy backend): every activation × loss,
depth 1 to 4, odd sizes. L(θ + εeᵢ) − L(θ − εeᵢ) / 2ε must match the analytic ∂L/∂θᵢ."""
import numpy as np
import pytest

from gpubp import activations as acts
from helpers import make_data, make_net

EPS = 1e-6


def numeric_gradient(net, X, y, loss, layer, name, index):
    params = net.get_params()
    original = params[layer][name][index]
    values = []
    for sign in (+1, -1):
        params[layer][name][index] = original + sign * EPS
        net.set_params(params)
        values.append(net.evaluate(X, y, loss)[0])
    params[layer][name][index] = original
    net.set_params(params)
    return (values[0] - values[1]) / (2 * EPS)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("loss", ["mse", "bce", "softmax_ce"])
@pytest.mark.parametrize("hidden", list(acts.NAMES))
def test_gradients_match_finite_differences(hidden, loss, depth, rng):
    widths = [7, 3, 33, 1][: depth - 1]
    n_out = 3 if loss == "softmax_ce" else (1 if depth % 2 else 3)
    sizes = [3] + widths + [n_out]
    net = make_net(sizes, hidden=hidden, loss=loss, output=None if loss != "mse" else hidden, seed=depth)
    X, y = make_data(rng, 7, sizes[0], n_out, loss)
    analytic = net.gradients(X, y, loss)
    for layer, grads in enumerate(analytic):
        for name, g in grads.items():
            # a handful of coordinates per array, chosen at random, keeps 60 cases fast
            for flat in rng.choice(g.size, size=min(g.size, 4), replace=False):
                index = np.unravel_index(flat, g.shape)
                numeric = numeric_gradient(net, X, y, loss, layer, name, index)
                assert g[index] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (layer, name, index)
