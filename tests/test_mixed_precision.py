"""Mixed precision (issue 12): the API, the numpy reference of every precision against the contract written out
by hand (gpubp/backends/base.py), the seed example, 50 training steps, and the fp16 loss scaler.

The contract, as these tests spell it (round_p = precision.round_operand, store = RNE into the output's type):
    Z = round_p(A_prev)·round_p(W)ᵀ + b     A = store(g(Z))        (hidden A and every δ 16-bit for bf16/fp16)
    δ_prev = store((round_p(δ)·round_p(W)) ⊙ g'(Z_prev))          dW = round_p(δ)ᵀ·round_p(A_prev)   db = Σ δ
"""
import numpy as np
import pytest

import gpubp
from gpubp import activations as acts
from gpubp import loss_scale as LS
from gpubp import precision as P
from gpubp.backends.numpy_backend import NumpyBackend
from helpers import check_seed_example_in_precision, make_data, seed_net, snapshot

REDUCED = ["tf32", "bf16", "fp16"]
SIXTEEN = ["bf16", "fp16"]


def net_of(precision, sizes=(5, 16, 12, 3), hidden="tanh", loss="softmax_ce", backend="numpy", seed=0):
    output = "sigmoid" if loss == "bce" else "identity"
    layers = [gpubp.Dense(a, b, hidden if i < len(sizes) - 2 else output)
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    return gpubp.Sequential(*layers, backend=backend, seed=seed, precision=precision)


def stored(x, precision):
    """x (float32/64) as a hidden A or δ of `precision` holds it, in float32."""
    return P.round_operand(x, precision) if precision in SIXTEEN else np.asarray(x, np.float32)


# ---- the API ------------------------------------------------------------------------------------------------
def test_bad_precision_is_refused_naming_both_values():
    with pytest.raises(ValueError, match=r"precision.*'fp8'"):
        net_of("fp8")
    with pytest.raises(ValueError, match=r"precision='bf16'.*dtype='float64'"):
        gpubp.Sequential(gpubp.Dense(2, 1), dtype="float64", precision="bf16", backend="numpy")
    with pytest.raises(ValueError, match="precision"):
        net_of(16)

    class Fp32Only(NumpyBackend):
        PRECISIONS = ("fp32",)
    with pytest.raises(ValueError, match=r"precision='fp16' is not implemented on backend 'numpy'"):
        gpubp.Sequential(gpubp.Dense(2, 1), backend=Fp32Only(), precision="fp16")


def test_precision_defaults_repr_and_storage():
    assert net_of(None).precision == "fp32"
    assert gpubp.Sequential(gpubp.Dense(2, 1), dtype="float64", backend="numpy").precision is None
    assert "precision" not in repr(net_of("fp32"))
    for precision in PRECISIONS_ALL:
        net = net_of(precision)
        assert ("precision=%r" % precision in repr(net)) == (precision != "fp32")
        ws = net._workspace(7)
        narrow = np.dtype(P.storage_dtype(precision))
        assert [a.dtype for a in ws.A] == [narrow, narrow, np.float32]      # the prediction stays float32
        assert [g.dtype for g in ws.G] == [narrow] * 3
        assert all(z.dtype == np.float32 for z in ws.Z)
        assert (net.scaler is not None) == (precision == "fp16")


PRECISIONS_ALL = ["fp32"] + REDUCED


# ---- each op against the contract --------------------------------------------------------------------------
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("N", [1, 7, 33])
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh", "leaky_relu"])
def test_ops_follow_the_contract(rng, precision, N, act):
    be, act_id = NumpyBackend(), acts.activation_id(act)
    narrow = be.storage_dtype(precision)
    n_in, n_out = 13, 9
    A_prev = stored(rng.standard_normal((N, n_in)), precision).astype(narrow)
    W, b = rng.standard_normal((n_out, n_in)).astype(np.float32), rng.standard_normal(n_out).astype(np.float32)
    Z, A = np.full((N, n_out), np.nan, np.float32), np.full((N, n_out), np.nan, narrow)
    be.dense_forward(A_prev, W, b, act_id, 0.1, Z, A, precision)
    # Z: the float64 product of the rounded operands, within float32 accumulation error
    exact = P.reference_gemm(P.decode(A_prev, precision), W, precision).astype(np.float64) + b
    bound = 4 * n_in * 2.0**-24 * (np.abs(P.round_operand(P.decode(A_prev, precision), precision)).astype(np.float64)
                                   @ np.abs(P.round_operand(W, precision)).T + np.abs(b))
    assert (np.abs(Z - exact) <= bound).all()
    # A: exactly store(g(Z))
    np.testing.assert_array_equal(P.decode(A, precision), stored(acts.forward(act_id, Z.copy(), 0.1), precision))

    delta = stored(rng.standard_normal((N, n_out)), precision).astype(narrow)
    Z_prev = rng.standard_normal((N, n_in)).astype(np.float32)
    A_prev_out = stored(acts.forward(act_id, Z_prev.copy(), 0.1), precision).astype(narrow)
    delta_prev = np.full((N, n_in), np.nan, narrow)
    be.input_grad_masked(delta, W, Z_prev, A_prev_out, act_id, 0.1, delta_prev, precision)
    dA = P.round_operand(P.decode(delta, precision), precision) @ P.round_operand(W, precision)   # float32
    want = stored(acts.derivative_mask(act_id, dA, Z_prev, P.decode(A_prev_out, precision), 0.1), precision)
    got = P.decode(delta_prev, precision)
    ulp = 2.0 ** -(P.SIGNIFICAND_BITS[precision] if precision in SIXTEEN else 22)   # one storage ulp, relative
    assert (np.abs(got - want) <= ulp * np.abs(want) + 1e-6).all()

    dW, db = np.full((n_out, n_in), np.nan, np.float32), np.full(n_out, np.nan, np.float32)
    be.weight_grad(delta, A_prev, dW, db, precision=precision)
    np.testing.assert_allclose(dW, P.reference_gemm(P.decode(delta, precision).T, P.decode(A_prev, precision).T,
                                                    precision), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, P.decode(delta, precision).astype(np.float64).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", REDUCED)
def test_operands_are_rounded_not_just_stored(rng, precision):
    """float32 operands (W, X) reach the GEMM rounded: the product of values with low bits set differs from the
    float32 product by far more than float32 accumulation error. (Catches a reference that skips the rounding.)"""
    be = NumpyBackend()
    x = (1 + 2.0**-20 * np.arange(1, 9, dtype=np.float32)).reshape(1, 8)   # bits below every reduced format
    W = np.ones((1, 8), np.float32)
    Z, A = np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32)
    be.dense_forward(x, W, None, acts.IDENTITY, 0.0, Z, A, precision)
    assert Z[0, 0] == 8.0 and float(x.astype(np.float64).sum()) != 8.0


# ---- whole networks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS_ALL)
def test_seed_example_in_every_precision(backend_name, precision):
    """The seed's numbers are exact in every format (2, 3, 6, 0.5, 12 ...), so every precision gives them
    exactly. In fp16 the first two steps overflow (δ_out = 2·S with S = 2¹⁶, then 2¹⁵: above fp16's 65504),
    are skipped and halve the scale; the third applies the update (checked: that is the loss scaler working)."""
    net = gpubp.Sequential(gpubp.Dense(1, 1, "identity", bias=False), gpubp.Dense(1, 1, "relu", bias=False),
                           backend=backend_name, precision=precision) if _has(backend_name, precision) else None
    if net is None:
        pytest.skip(f"precision {precision!r} is not implemented on the {backend_name} backend yet")
    net.set_params([{"W": np.array([[3.0]])}, {"W": np.array([[0.5]])}])
    check_seed_example_in_precision(net, precision)


def _has(backend_name, precision):
    from gpubp.backends import get_backend
    return precision in get_backend(backend_name).PRECISIONS


def contract_forward_backward(net, X, Y, precision):
    """The whole network's mse gradients as the contract defines them, written out here in float64 products of
    rounded operands (an independent check of the backend ops composed by the network)."""
    params = net.get_params()
    r = lambda x: P.round_operand(x, precision).astype(np.float64)   # noqa: E731 - an operand
    A_list, Z_list, a = [], [], np.asarray(X, np.float32)
    for i, (layer, p) in enumerate(zip(net.layers, params)):
        Z = (r(a) @ r(p["W"]).T + p["b"]).astype(np.float32)
        A = acts.forward(layer.act, Z.copy(), layer.alpha)
        a = A if i == len(net.layers) - 1 else stored(A, precision)
        Z_list.append(Z), A_list.append(a)
    N = X.shape[0]
    delta = stored((A_list[-1] - Y) / N * 1, precision)          # mse with identity output: F' = 1
    grads = [None] * len(params)
    for i in reversed(range(len(params))):
        a_prev = np.asarray(X, np.float32) if i == 0 else A_list[i - 1]
        grads[i] = {"W": r(delta).T @ r(a_prev), "b": delta.astype(np.float64).sum(0)}
        if i:
            dA = (r(delta) @ r(params[i]["W"])).astype(np.float32)
            delta = stored(acts.derivative_mask(net.layers[i - 1].act, dA, Z_list[i - 1], A_list[i - 1],
                                                net.layers[i - 1].alpha), precision)
    return grads


@pytest.mark.parametrize("precision", REDUCED)
def test_whole_network_gradients_follow_the_contract(rng, precision):
    net = net_of(precision, sizes=(6, 16, 16, 2), hidden="tanh", loss="mse")
    X, y = make_data(rng, 33, 6, 2, "mse")
    got = net.gradients(X, y, loss="mse")
    want = contract_forward_backward(net, X, y, precision)
    fp32 = net_of("fp32", sizes=(6, 16, 16, 2), hidden="tanh", loss="mse").gradients(X, y, loss="mse")
    for g, w, f in zip(got, want, fp32):
        for k in g:
            scale = np.abs(w[k]).max()
            # tight against the contract (float32 accumulation, the odd 16-bit rounding tie); against fp32 near
            # in norm (tanh, not relu: a relu whose Z is near 0 may switch and move a whole row in any precision)
            assert np.abs(g[k] - w[k]).max() <= 2e-3 * scale, k
            assert np.linalg.norm(f[k] - w[k]) <= 0.02 * np.linalg.norm(w[k]), k
    if precision != "tf32":   # rounding shows: the reduced gradients are not the fp32 ones
        assert any(not np.array_equal(g[k], f[k]) for g, f in zip(got, fp32) for k in g)


@pytest.mark.parametrize("precision", REDUCED)
def test_fifty_steps_track_fp32(rng, precision):
    X, y = make_data(rng, 64, 5, 3, "softmax_ce")
    curves = {}
    for p in ("fp32", precision):
        net = net_of(p)
        opt = gpubp.Adam(net, lr=1e-2)
        curves[p] = np.array([net.train_step(X, y, "softmax_ce", opt) for _ in range(50)])
        assert np.isfinite(net.get_params()[0]["W"]).all()
    assert curves[precision][-1] < 0.6 * curves[precision][0]
    np.testing.assert_allclose(curves[precision], curves["fp32"], rtol=0.05, atol=0.01)


@pytest.mark.parametrize("precision", SIXTEEN)
def test_one_16_bit_copy_of_the_weights_follows_the_parameters(rng, precision):
    """bf16/fp16 on the per-layer path: every layer's W16 is a view of the model's one 16-bit copy of its flat
    parameters, at W's offset, holding round_p(W) after a forward (a step's update follows its forward: until the
    next forward the copy holds the weights before it, which nothing reads); steps are bit-identical to rounding W
    in every GEMM (no copy), and set_params between steps reaches the next forward (the copy is rebuilt each time)."""
    X, y = make_data(rng, 17, 7, 3, "softmax_ce")
    new = lambda: gpubp.Sequential(gpubp.Dense(7, 5, "tanh"), gpubp.Dense(5, 3), backend="numpy",  # noqa: E731
                                   precision=precision, fused=False)
    nets = {"copy": new(), "per GEMM": new()}
    nets["per GEMM"].params16 = None
    for layer in nets["per GEMM"].layers:
        layer.W16 = None
    for net in nets.values():
        opt = gpubp.Adam(net, lr=1e-2)
        net.curve = [net.train_step(X, y, "softmax_ce", opt) for _ in range(3)]
    net = nets["copy"]
    assert net.curve == nets["per GEMM"].curve
    for got, want in zip(net.get_params(), nets["per GEMM"].get_params()):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    np.testing.assert_array_equal(net.predict(X), nets["per GEMM"].predict(X))   # a forward: the copy is current
    for layer, (_, name, _, offset) in zip(net.layers, [e for e in net.layout.entries if e[1] == "W"]):
        assert layer.W16.dtype == P.storage_dtype(precision) and np.shares_memory(layer.W16, net.params16)
        assert offset % 8 == 0   # 16-byte aligned start (FlatLayout.ALIGN): rows aligned whenever n_in % 8 == 0
        np.testing.assert_array_equal(layer.W16.astype(np.float32), P.round_operand(layer.W, precision))
    params = [{k: v * 2 for k, v in p.items()} for p in net.get_params()]
    for each in nets.values():
        each.set_params(params)
    np.testing.assert_array_equal(net.predict(X), nets["per GEMM"].predict(X))
    for layer in net.layers:
        np.testing.assert_array_equal(layer.W16.astype(np.float32), P.round_operand(layer.W, precision))


# ---- the fp16 loss scaler -------------------------------------------------------------------------------------
def test_loss_scaler_skips_an_overflow_and_backs_off(rng):
    """A planted overflow: a scale of 2⁶⁰ makes the stored fp16 δ infinite. The step is skipped (parameters and
    Adam's state bit for bit as before, nothing non-finite), counted as a step, its loss reported; the scale
    halves; Adam's own step count does not move."""
    net = net_of("fp16")
    opt = gpubp.Adam(net, lr=1e-2)
    X, y = make_data(rng, 7, 5, 3, "softmax_ce")
    net.train_step(X, y, "softmax_ce", opt)
    net.backend.copy_into(net.scaler, LS.fresh(scale=2.0**60))
    before = snapshot(net)
    loss = net.train_step(X, y, "softmax_ce", opt)
    assert np.isfinite(loss)
    assert net.loss_scale == (2.0**59, 1)
    after = snapshot(net)
    assert after.pop("steps") == before.pop("steps") + 1
    before["steps"] = after["steps"] = 0
    net.steps  # noqa: B018 - settles the guard
    for key in before:
        if isinstance(before[key], np.ndarray):
            np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert int(opt.state_arrays()["step"][0]) == 1
    # backs off until the step goes through, then trains normally
    for _ in range(45):
        net.train_step(X, y, "softmax_ce", opt)
    scale, overflows = net.loss_scale
    assert overflows > 1 and scale < 2.0**40 and int(opt.state_arrays()["step"][0]) >= 1
    assert np.isfinite(net.backend.to_numpy(net.params)).all()


def test_loss_scaler_grows_after_the_interval(rng):
    net = net_of("fp16")
    opt = gpubp.SGD(net, lr=1e-2)
    net.backend.copy_into(net.scaler, LS.fresh(scale=8.0, growth_interval=3))
    X, y = make_data(rng, 7, 5, 3, "softmax_ce")
    seen = []
    for _ in range(7):
        net.train_step(X, y, "softmax_ce", opt)
        seen.append(net.loss_scale[0])
    assert seen == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]


def test_loss_scaling_gives_the_unscaled_gradients(rng):
    """gradients() of an fp16 model are those of the loss, not of S·loss, whatever S is."""
    net = net_of("fp16", hidden="relu")
    X, y = make_data(rng, 7, 5, 3, "softmax_ce")
    g1 = net.gradients(X, y, "softmax_ce")
    net.backend.copy_into(net.scaler, LS.fresh(scale=2.0**4))
    g2 = net.gradients(X, y, "softmax_ce")
    for a, b in zip(g1, g2):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=1e-5)


def test_real_fault_is_still_reported_in_fp16(rng):
    """A non-finite loss is a fault, not an overflow: the scaler leaves it for the host to raise."""
    net = net_of("fp16", loss="mse", sizes=(5, 16, 3))
    opt = gpubp.SGD(net, lr=1e30)
    X, y = make_data(rng, 7, 5, 3, "mse")
    with pytest.raises(FloatingPointError):
        for _ in range(5):
            net.train_step(X, y * 1e30, "mse", opt)
    assert np.isfinite(net.backend.to_numpy(net.params)).all()


# ---- checkpoints -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS_ALL)
def test_checkpoint_keeps_precision_and_scaler(tmp_path, rng, precision):
    net = net_of(precision)
    opt = gpubp.Adam(net, lr=1e-2)
    X, y = make_data(rng, 7, 5, 3, "softmax_ce")
    net.train_step(X, y, "softmax_ce", opt)
    if precision == "fp16":
        net.backend.copy_into(net.scaler, LS.fresh(scale=1024.0, good=5, overflows=3))
    net.save(tmp_path / "m.npz")
    back = gpubp.load(tmp_path / "m.npz", backend="numpy")
    assert back.precision == precision and repr(back) == repr(net)
    assert back.loss_scale == net.loss_scale
    if precision == "fp16":
        np.testing.assert_array_equal(back.backend.to_numpy(back.scaler), net.backend.to_numpy(net.scaler))
    assert net.train_step(X, y, "softmax_ce", opt) == back.train_step(X, y, "softmax_ce", back.optimizer)


def test_hostile_checkpoint_precision_and_scaler(tmp_path, rng):
    import json
    net = net_of("fp16")
    net.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = dict(f)
    meta = json.loads(str(arrays["meta"]))
    for bad_meta, match in (({"precision": "fp7"}, "precision"), ({"precision": "bf16", "dtype": "float64"}, "float64")):
        np.savez(tmp_path / "bad.npz", **dict(arrays, meta=np.array(json.dumps(dict(meta, **bad_meta)))))
        with pytest.raises(ValueError, match=match):
            gpubp.load(tmp_path / "bad.npz", backend="numpy")
    for value in (np.nan, -1.0, 0.0, 2.0**200):
        scaler = arrays["loss_scaler"].copy()
        scaler[LS.SCALE] = value
        np.savez(tmp_path / "bad.npz", **dict(arrays, loss_scaler=scaler))
        with pytest.raises(ValueError, match="loss scaler"):
            gpubp.load(tmp_path / "bad.npz", backend="numpy")
    missing = {k: v for k, v in arrays.items() if k != "loss_scaler"}
    np.savez(tmp_path / "bad.npz", **missing)
    with pytest.raises(ValueError, match="loss_scaler"):
        gpubp.load(tmp_path / "bad.npz", backend="numpy")


def test_old_checkpoint_without_precision_loads_as_fp32(tmp_path):
    import json
    net = seed_net(dtype="float32")
    net.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = dict(f)
    meta = json.loads(str(arrays["meta"]))
    del meta["precision"]
    np.savez(tmp_path / "old.npz", **dict(arrays, meta=np.array(json.dumps(meta))))
    assert gpubp.load(tmp_path / "old.npz", backend="numpy").precision == "fp32"


# ---- real data --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["digits", "breast_cancer"])
def test_bf16_reaches_the_fp32_accuracy_on_real_data(dataset):
    """Held-out accuracy in bf16 within one point of fp32 (numpy reference), on scikit-learn's bundled data."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    order = np.random.default_rng(0).permutation(len(y))
    X, y = X[order], y[order]
    cut = int(0.75 * len(y))
    classes = int(y.max()) + 1
    accuracy = {}
    for precision in ("fp32", "bf16"):
        net = gpubp.Sequential(gpubp.Dense(X.shape[1], 64, "relu"), gpubp.Dense(64, classes),
                               backend="numpy", precision=precision, seed=1)
        net.fit(X[:cut], y[:cut], "softmax_ce", gpubp.Adam(net, lr=3e-3), epochs=15, batch_size=64)
        accuracy[precision] = float((net.predict(X[cut:]).argmax(1) == y[cut:]).mean())
    assert accuracy["fp32"] > 0.9
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.01


def test_checkpoint_on_a_backend_without_its_precision_says_so(tmp_path):
    """A sound bf16 checkpoint loaded on a backend that has no bf16: the error names the backend's lack, not a
    malformed file."""
    class Fp32Only(NumpyBackend):
        PRECISIONS = ("fp32",)
    net_of("bf16").save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match=r"cannot be loaded on this backend: precision='bf16' is not implemented") as err:
        gpubp.load(tmp_path / "m.npz", backend=Fp32Only())
    assert "malformed" not in str(err.value)
