"""The fully fused MLP wired into Sequential (issue 13): Sequential(..., fused="auto" | True | False).

The fused path (Backend.fused_train / fused_forward: kernels/fused_mlp.cu on cupy, gpubp/fused.py's reference
on numpy) must give the per-layer path's results to rounding on the same model: the two differ only in the
order of float32 sums and in relu's mask at a positive Z that rounds to A = 0 (gpubp/fused.py), so gradients
agree to the tolerance of tests/test_mixed_precision.py's contract test (2e-3 of the largest), and the seed's
exact numbers stay exact. The cupy backend runs on the CPU emulation of CUDA (tests/cuda_emulation), the real
kernel source through CupyBackend's own launch code; no GPU has run any of it.
"""
import numpy as np
import pytest

import gpubp
from gpubp import fused as F
from gpubp.backends.numpy_backend import NumpyBackend
from helpers import check_seed_example_in_precision, make_data

from cuda_emulation import emulator as emulator_module

SIXTEEN = ["bf16", "fp16"]
LOSS_OUTPUT = {"mse": "identity", "bce": "sigmoid", "softmax_ce": "identity"}


class NoFusedBackend(NumpyBackend):
    """A backend without the fused path (as numba): auto falls back, True is refused."""
    name = "nofused"
    FUSED = False


def mlp(precision, sizes=(7, 16, 16, 3), hidden="relu", loss="softmax_ce", backend="numpy", fused="auto", seed=3,
        bias=True):
    layers = [gpubp.Dense(a, b, hidden if i < len(sizes) - 2 else LOSS_OUTPUT[loss], bias=bias)
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    return gpubp.Sequential(*layers, backend=backend, seed=seed, precision=precision, fused=fused)


def assert_close_gradients(got, want, rel=2e-3):
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for k in w:
            assert np.abs(g[k] - w[k]).max() <= rel * np.abs(w[k]).max(), k


# ---- the API ------------------------------------------------------------------------------------------------------
# (sizes, the kernel width H where the model qualifies, else None): mixed and odd hidden widths run zero-padded
MODELS = [((7, 16, 16, 3), 16), ((5, 32, 2), 32), ((3, 16, 12, 3), 16), ((4, 8, 8, 2), 16), ((6, 16, 16, 200), None),
          ((6, 3), None), ((9, 64, 64, 64, 10), 64), ((3, 100, 20, 3), 128), ((3, 16, 129, 3), None)]


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("sizes,H", MODELS, ids=str)
def test_auto_picks_the_fused_path_exactly_when_it_qualifies(precision, sizes, H):
    net = mlp(precision, sizes)
    assert net.fused == F.qualifies(net.layers, precision)[0]
    assert net.fused == (precision in SIXTEEN and H is not None)
    assert not mlp(precision, sizes, fused=False).fused
    assert not mlp(precision, sizes, backend=NoFusedBackend()).fused     # no fused path: per-layer, no error
    ws = net._workspace(5)
    assert ws.hidden.shape == (len(sizes) - 2, 5, H) if net.fused else ws.hidden is None


def test_fused_true_is_refused_naming_why():
    with pytest.raises(ValueError, match=r"fused=True.*layer 1 \(Dense\(16, 129\)\): hidden width 129: .* up to 128"):
        mlp("bf16", (3, 16, 129, 3), fused=True)
    with pytest.raises(ValueError, match=r"fused=True.*output width 129"):
        mlp("bf16", (3, 16, 12, 129), fused=True)
    with pytest.raises(ValueError, match=r"fused=True.*precision 'fp32'"):
        mlp("fp32", fused=True)
    with pytest.raises(ValueError, match=r"fused=True.*precision None"):   # float64 models multiply in float64
        gpubp.Sequential(gpubp.Dense(3, 16), gpubp.Dense(16, 2), dtype="float64", backend="numpy", fused=True)
    with pytest.raises(ValueError, match=r"fused=True: backend 'nofused' has no fused MLP path"):
        mlp("bf16", backend=NoFusedBackend(), fused=True)
    for bad in ("on", 1, 0, None, "Auto"):
        with pytest.raises(ValueError, match=r"fused: expected 'auto', True or False, got " + repr(bad)):
            mlp("bf16", fused=bad)
    assert mlp("bf16", fused=True).fused and mlp("bf16", (3, 16, 12, 3), fused=True).fused


def test_repr_and_checkpoint_keep_the_setting(tmp_path, rng):
    assert "fused" not in repr(mlp("bf16"))
    assert "fused=False" in repr(mlp("bf16", fused=False)) and "fused=True" in repr(mlp("bf16", fused=True))
    X, y = make_data(rng, 20, 7, 3, "softmax_ce")
    for setting in ("auto", True, False):
        net = mlp("fp16", fused=setting)
        net.train_step(X, y, "softmax_ce", gpubp.SGD(net, lr=0.1))
        net.save(tmp_path / "m.npz")
        loaded = gpubp.load(tmp_path / "m.npz")
        assert loaded.fused_setting == setting and loaded.fused == (setting is not False)
        np.testing.assert_array_equal(loaded.predict(X), net.predict(X))


# ---- fused against per-layer, numpy -------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", SIXTEEN)
@pytest.mark.parametrize("loss,hidden,bias,sizes", [("softmax_ce", "relu", True, (7, 16, 16, 16, 3)),
                                                    ("mse", "tanh", False, (7, 16, 16, 16, 3)),
                                                    ("bce", "leaky_relu", True, (7, 20, 33, 3)),
                                                    ("mse", "sigmoid", True, (7, 48, 16, 50, 3))])
def test_fused_and_per_layer_agree(rng, precision, loss, hidden, bias, sizes):
    """gradients() (whole network, every layer's dW and db), predict and evaluate on the same model; hidden
    widths equal, or mixed and of no kernel instance (the fused path pads them)."""
    X, y = make_data(rng, 45, 7, 3, loss)
    nets = {f: mlp(precision, sizes, hidden, loss, fused=f, bias=bias) for f in (True, False)}
    assert nets[True].fused and not nets[False].fused
    grads = {f: net.gradients(X, y, loss) for f, net in nets.items()}
    assert_close_gradients(grads[True], grads[False])
    np.testing.assert_allclose(nets[True].predict(X), nets[False].predict(X), rtol=1e-5, atol=1e-6)
    (loss_f, accuracy_f), (loss_p, accuracy_p) = (net.evaluate(X, y, loss) for net in nets.values())
    assert loss_f == pytest.approx(loss_p, rel=1e-6) and accuracy_f == accuracy_p


@pytest.mark.parametrize("precision", SIXTEEN)
@pytest.mark.parametrize("sizes", [(6, 32, 32, 4), (6, 50, 20, 4)], ids=str)
def test_whole_network_gradients_are_the_fused_reference(rng, precision, sizes):
    """Against gpubp/fused.py composed by hand (on the real shapes): forward, the loss, backward,
    weight_gradients."""
    net = mlp(precision, sizes, "relu", "mse")
    X, y = make_data(rng, 40, 6, 4, "mse")
    params = net.get_params()
    Ws = [p["W"].astype(np.float32) for p in params]
    bs = [p["b"].astype(np.float32) for p in params]
    act_ids, alphas = [l.act for l in net.layers], [l.alpha for l in net.layers]
    hidden, Z = F.forward(X, Ws, bs, act_ids, alphas, precision, training=True)
    _, delta_out, _ = F.output_loss(Z, y, 0, act_ids[-1], alphas[-1], precision,
                                    net.loss_scale[0] if precision == "fp16" else 1.0)
    want = F.weight_gradients(X, hidden, F.backward(delta_out, Ws, hidden, act_ids, alphas, precision), delta_out,
                              precision)
    if precision == "fp16":
        want = [{k: v / np.float32(net.loss_scale[0]) for k, v in w.items()} for w in want]
    assert_close_gradients(net.gradients(X, y, "mse"), want, rel=1e-5)


@pytest.mark.parametrize("precision", SIXTEEN)
def test_fifty_steps_fused_track_per_layer(rng, precision):
    X, y = make_data(rng, 64, 7, 3, "softmax_ce")
    curves, params = {}, {}
    for f in (True, False):
        net = mlp(precision, fused=f)
        opt = gpubp.Adam(net, lr=1e-2)
        curves[f] = np.array([net.train_step(X, y, "softmax_ce", opt) for _ in range(50)])
        params[f] = net.get_params()
    assert curves[True][-1] < 0.6 * curves[True][0]
    np.testing.assert_allclose(curves[True], curves[False], rtol=0.02, atol=1e-3)


def test_fit_takes_the_fused_path(rng):
    """fit's sync-free loop (the guard, the optimizer, record_step) around the fused step: the same epochs."""
    X, y = make_data(rng, 96, 7, 3, "softmax_ce")
    history = {}
    for f in (True, False):
        net = mlp("bf16", fused=f)
        history[f] = net.fit(X, y, "softmax_ce", gpubp.SGD(net, lr=0.2), epochs=3, batch_size=32)
    np.testing.assert_allclose(history[True]["loss"], history[False]["loss"], rtol=1e-3)
    np.testing.assert_allclose(history[True]["accuracy"], history[False]["accuracy"], atol=1 / 96 + 1e-9)


def padded_seed_net(precision, backend="numpy"):
    """The seed's network with its hidden width 1 padded to 16 (fused.qualifies takes widths 16, 32, ...):
    m1 = 3 and m2 = 0.5 in the first hidden unit, zeros elsewhere. The padding units hold 0, get 0 gradient
    (their δ is m2's zero column times δ_out; their A is 0) and stay 0, so the numbers are the seed's."""
    net = gpubp.Sequential(gpubp.Dense(1, 16, "identity", bias=False), gpubp.Dense(16, 1, "relu", bias=False),
                           backend=backend, precision=precision, fused=True)
    W0, W1 = np.zeros((16, 1)), np.zeros((1, 16))
    W0[0, 0], W1[0, 0] = 3.0, 0.5
    net.set_params([{"W": W0}, {"W": W1}])
    return net


@pytest.mark.parametrize("precision", SIXTEEN)
def test_seed_example_through_the_fused_path(precision):
    """x = 2, y = 1: ŷ = 3, L = 2, dL/dm1 = 2, dL/dm2 = 12, then m1 = 2.8, m2 = −0.7, exactly (every number is
    exact in bf16 and fp16). fp16: the first two steps overflow (δ_out = 2·S, S = 2¹⁶ then 2¹⁵) and are skipped,
    the third applies the update, as on the per-layer path (tests/test_mixed_precision.py)."""
    net = padded_seed_net(precision)
    assert net.fused
    grads, params = check_seed_example_in_precision(net, precision)
    # the padding stays zero: no gradient reaches it, and so no update
    assert not grads[0]["W"][1:].any() and not grads[1]["W"][0, 1:].any()
    assert not params[0]["W"][1:].any() and not params[1]["W"][0, 1:].any()


def test_fp16_loss_scaling_through_the_fused_path(rng):
    """A scale of 2^24 overflows the stored fp16 δ_L: the fused path skips the same steps, backs the scale off
    the same way and ends with the per-layer path's parameters; gradients() returns unscaled gradients."""
    from gpubp import loss_scale
    X, y = make_data(rng, 30, 7, 3, "softmax_ce")
    seen = {}
    for f in (True, False):
        net = mlp("fp16", fused=f)
        grads = net.gradients(X, y, "softmax_ce")
        opt = gpubp.SGD(net, lr=0.05)
        net.backend.copy_into(net.scaler, loss_scale.fresh(scale=2.0**24))
        curve = [net.train_step(X, y, "softmax_ce", opt) for _ in range(12)]
        seen[f] = (net.loss_scale, net.steps, curve, net.get_params(), grads)
    assert seen[True][0] == seen[False][0] and seen[True][0][1] >= 2      # (scale, overflow steps)
    assert seen[True][1] == seen[False][1] == 12
    np.testing.assert_allclose(seen[True][2], seen[False][2], rtol=1e-3)
    assert_close_gradients(seen[True][3], seen[False][3], rel=2e-3)
    assert_close_gradients(seen[True][4], seen[False][4])


# ---- the cupy backend on the CPU emulation of CUDA ----------------------------------------------------------------
@pytest.fixture(scope="module")
def emulated(emulator):
    """CupyBackend on the emulator, as an H100 (132 SMs), with every kernel launch's name recorded."""
    from gpubp.backends import cupy_backend as cb
    patch = pytest.MonkeyPatch()
    launched = []

    def kernel(filename, name):
        launched.append(name)
        return emulator_module.EmulatedKernel(emulator, name)
    for module, name, value in emulator_module.patches(emulator, 132):
        patch.setattr(module, name, kernel if name == "_kernel" else value)
    backend = cb.CupyBackend()
    backend.use_graphs = True
    backend.launched = launched
    yield backend
    patch.undo()


# NOTE: N differs for the mixed-width model: the emulated backend is shared by the module's tests, and a step key
# (("gradients", N, loss), no model in it) already warmed by another model is captured at once, before this
# model's first eager call has made its alphas array (a host copy): that capture fails and the key runs eagerly.
@pytest.mark.parametrize("precision,sizes,hidden,N", [("bf16", (7, 16, 16, 3), "relu", 150),
                                                      ("fp16", (7, 16, 16, 3), "relu", 150),
                                                      ("bf16", (7, 40, 20, 3), "sigmoid", 129)], ids=str)
def test_emulated_cupy_fused_matches_per_layer_and_numpy(emulated, precision, sizes, hidden, N, rng):
    """On the emulated cupy backend: gradients() and predict of the fused path against its per-layer path and
    the numpy backend's fused path; then four train steps, loss by loss, replayed as a CUDA graph after the
    first (the step holds no host read), with the same parameters and fp16 scaler at the end. Mixed widths 40-20
    run on H = 48, zero-padded by the cupy backend (sigmoid: the padded units hold 0.5), against the numpy
    backend's fused path on the real shapes."""
    X, y = make_data(rng, N, 7, 3, "softmax_ce")   # two blocks of 128 rows, the second partial
    nets = {"fused": mlp(precision, sizes, hidden, backend=emulated, fused=True),
            "per-layer": mlp(precision, sizes, hidden, backend=emulated, fused=False),
            "numpy": mlp(precision, sizes, hidden, fused=True)}
    emulated.launched.clear()
    grads = {k: net.gradients(X, y, "softmax_ce") for k, net in nets.items()}
    assert any(n.startswith("fused_mlp_forward_kernel") for n in emulated.launched)
    assert_close_gradients(grads["fused"], grads["per-layer"])
    assert_close_gradients(grads["fused"], grads["numpy"])
    np.testing.assert_allclose(nets["fused"].predict(X), nets["numpy"].predict(X), rtol=1e-5, atol=1e-6)
    curves = {}
    for k, net in nets.items():
        opt = gpubp.Adam(net, lr=1e-2)
        curves[k] = [net.train_step(X, y, "softmax_ce", opt) for _ in range(4)]
    np.testing.assert_allclose(curves["fused"], curves["numpy"], rtol=1e-4)
    np.testing.assert_allclose(curves["fused"], curves["per-layer"], rtol=2e-3)
    assert not emulated.graph_errors
    fused_keys = [k for k, state in emulated._steps.items() if isinstance(state, tuple)]
    assert fused_keys, emulated._steps
    assert_close_gradients(nets["fused"].get_params(), nets["numpy"].get_params(), rel=2e-3)
    if precision == "fp16":
        assert nets["fused"].loss_scale == nets["numpy"].loss_scale


@pytest.mark.parametrize("by_hand", [True, False], ids=["padded-by-hand", "width-1"])
def test_emulated_cupy_seed_example_through_the_fused_path(emulated, by_hand):
    """The seed network on the emulated fused kernels, its hidden width 1 padded to 16 by hand or by the cupy
    backend: the seed's numbers exactly (the padding adds exact zeros)."""
    if by_hand:
        net = padded_seed_net("bf16", backend=emulated)
    else:
        net = gpubp.Sequential(gpubp.Dense(1, 1, "identity", bias=False), gpubp.Dense(1, 1, "relu", bias=False),
                               backend=emulated, precision="bf16", fused=True)
        net.set_params([{"W": np.array([[3.0]])}, {"W": np.array([[0.5]])}])
    X, y = np.array([[2.0]]), np.array([[1.0]])
    emulated.launched.clear()
    grads = net.gradients(X, y, loss="mse")
    assert "fused_mlp_backward_kernel<TcBf16, 16>" in emulated.launched
    assert grads[0]["W"][0, 0] == 2.0 and grads[1]["W"][0, 0] == 12.0
    assert net.train_step(X, y, loss="mse", optimizer=gpubp.SGD(net, lr=0.1)) == 2.0
    params = net.get_params()
    assert params[0]["W"][0, 0] == np.float32(2.8) and params[1]["W"][0, 0] == np.float32(0.5) - np.float32(1.2)
