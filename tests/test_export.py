"""gpubp.export: ONNX (checked by onnx.checker, run by onnxruntime on the CPU) and PyTorch (to_torch, from_torch),
each against net.predict on random inputs, to rounding; and `gpubp export` on the command line."""
import numpy as np
import pytest

import gpubp
from gpubp import activations as acts
from gpubp.cli import main as cli_main

ACTIVATIONS = list(acts.NAMES)
DTYPES = ["float32", "float64"]
TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-13)}


def random_net(rng, activations, dtype="float64", widths=None, bias=True, alpha=0.2):
    """An MLP with one layer per activation; weights large enough that every activation sees both signs."""
    widths = widths or [5] + [int(w) for w in rng.integers(2, 7, len(activations))]
    layers = [gpubp.Dense(a, b, act, bias=bias, alpha=alpha)
              for a, b, act in zip(widths[:-1], widths[1:], activations)]
    net = gpubp.Sequential(*layers, backend="numpy", dtype=dtype, seed=int(rng.integers(1000)))
    net.set_params([{k: 2 * v for k, v in p.items()} for p in net.get_params()])
    return net


def softmax(Z):
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


# ---- ONNX ---------------------------------------------------------------------------------------------------------
def _onnx():
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install gpubp[onnx])")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install gpubp[onnx])")
    return onnx, ort


def run_onnx(model, X):
    _, ort = _onnx()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"X": X})
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output", ACTIVATIONS)
def test_onnx_matches_predict(rng, dtype, output):
    onnx, _ = _onnx()
    hidden = [a for a in ACTIVATIONS if a != output][:2]
    net = random_net(rng, hidden + [output], dtype)
    model = gpubp.export.to_onnx(net)
    onnx.checker.check_model(model, full_check=True)
    for N in (1, 7):          # the batch dimension is dynamic
        X = rng.standard_normal((N, net.n_in)).astype(dtype)
        out = run_onnx(model, X)
        assert out.dtype == np.dtype(dtype) and out.shape == (N, net.n_out)
        np.testing.assert_allclose(out, net.predict(X), **TOL[dtype])


@pytest.mark.parametrize("alpha", [0.2, 3.0])
def test_onnx_honours_leaky_relu_alpha(rng, alpha):
    net = random_net(rng, ["leaky_relu", "leaky_relu"], alpha=alpha)
    X = rng.standard_normal((20, net.n_in))
    assert (net.predict(X) < 0).any()           # the negative branch, where alpha shows, is exercised
    np.testing.assert_allclose(run_onnx(gpubp.export.to_onnx(net), X), net.predict(X), **TOL["float64"])


def test_onnx_without_bias_and_written_to_a_file(rng, tmp_path):
    onnx, _ = _onnx()
    net = random_net(rng, ["tanh", "identity"], "float32", bias=False)
    model = gpubp.export.to_onnx(net, tmp_path / "m.onnx", opset=11)
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert loaded.SerializeToString() == model.SerializeToString()
    assert loaded.opset_import[0].version == 11
    X = rng.standard_normal((4, net.n_in)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(loaded, X), net.predict(X), **TOL["float32"])


def test_onnx_probabilities(rng):
    X = rng.standard_normal((9, 5))
    logits = random_net(rng, ["relu", "identity"], widths=[5, 6, 4])
    np.testing.assert_allclose(run_onnx(gpubp.export.to_onnx(logits, probabilities=True), X),
                               softmax(logits.predict(X)), **TOL["float64"])
    logit = random_net(rng, ["relu", "identity"], widths=[5, 6, 1])
    np.testing.assert_allclose(run_onnx(gpubp.export.to_onnx(logit, probabilities=True), X),
                               1 / (1 + np.exp(-logit.predict(X))), **TOL["float64"])
    sigmoid = random_net(rng, ["relu", "sigmoid"], widths=[5, 6, 1])      # already probabilities: unchanged
    np.testing.assert_allclose(run_onnx(gpubp.export.to_onnx(sigmoid, probabilities=True), X),
                               sigmoid.predict(X), **TOL["float64"])
    with pytest.raises(ValueError, match="probabilities=True.*'tanh'"):
        gpubp.export.to_onnx(random_net(rng, ["relu", "tanh"]), probabilities=True)


def test_onnx_scaling(rng):
    net = random_net(rng, ["tanh", "identity"], widths=[3, 4, 2])
    mean, std, out_mean, out_std = rng.standard_normal(3), rng.random(3) + 0.5, np.array([10.0, -3.0]), np.array([2.0, 5.0])
    X = rng.standard_normal((6, 3)) * 4 + 1
    model = gpubp.export.to_onnx(net, input_scaling=(mean, std), output_scaling=(out_mean, out_std))
    np.testing.assert_allclose(run_onnx(model, X), net.predict((X - mean) / std) * out_std + out_mean,
                               **TOL["float64"])


@pytest.mark.parametrize("call, error, match", [
    (lambda net: gpubp.export.to_onnx("net"), TypeError, "gpubp.Sequential"),
    (lambda net: gpubp.export.to_onnx(net, opset=7), ValueError, "opset"),
    (lambda net: gpubp.export.to_onnx(net, opset=10**6), ValueError, "opset"),
    (lambda net: gpubp.export.to_onnx(net, probabilities="yes"), TypeError, "probabilities"),
    (lambda net: gpubp.export.to_onnx(net, input_scaling=([0.0] * 2, [1.0] * 2)), ValueError, "input_scaling mean"),
    (lambda net: gpubp.export.to_onnx(net, input_scaling=(0.0, 0.0)), ValueError, "input_scaling std"),
], ids=["not-a-net", "old-opset", "future-opset", "probabilities", "scaling-width", "zero-std"])
def test_onnx_bad_arguments(rng, call, error, match):
    _onnx()
    net = random_net(rng, ["relu", "identity"])
    with pytest.raises(error, match=match):
        call(net)


def test_cli_export_builds_the_preprocessing_into_the_graph(tmp_path, capsys):
    """`gpubp export` of a `gpubp train` checkpoint: the graph takes raw features and gives what predict gives
    (regression values in the target's units); of a plain checkpoint: the network as it is."""
    _onnx()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 2)) * [3.0, 0.5] + [10.0, -2.0]
    np.savez(tmp_path / "r.npz", X=X, y=1000.0 + 50.0 * X[:, 0] - 20.0 * X[:, 1])
    assert cli_main(["train", "--data", str(tmp_path / "r.npz"), "--epochs", "2", "--layers", "4",
                     "--backend", "numpy", "--save", str(tmp_path / "m.npz")]) == 0
    assert cli_main(["export", str(tmp_path / "m.npz"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "values in the target's units" in capsys.readouterr().out
    import onnx
    from gpubp import data as gdata
    net = gpubp.load(tmp_path / "m.npz", backend="numpy")
    saved = net.extra["gpubp_cli"]
    expected = gdata.Targets.from_dict(saved["targets"]).decode(
        net.predict(gdata.Standardizer.from_dict(saved["features"]).transform(X)))
    np.testing.assert_allclose(run_onnx(onnx.load(str(tmp_path / "m.onnx")), X.astype(np.float32)), expected,
                               rtol=1e-5)

    plain = random_net(rng, ["relu", "identity"], "float32", widths=[3, 4, 3])
    plain.save(tmp_path / "plain.npz")
    assert cli_main(["export", str(tmp_path / "plain.npz"), "--onnx", str(tmp_path / "p.onnx"),
                     "--probabilities"]) == 0
    X = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(onnx.load(str(tmp_path / "p.onnx")), X), softmax(plain.predict(X)),
                               **TOL["float32"])
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "plain.npz"), "--onnx", str(tmp_path / "q.onnx"), "--opset", "3"]) == 2
    assert "gpubp: error: opset" in capsys.readouterr().err and not (tmp_path / "q.onnx").exists()


# ---- PyTorch ------------------------------------------------------------------------------------------------------
TORCH_SKIP = "torch is not installed (the test extra has it): pip install gpubp[torch] to run these tests"


def _torch():
    return pytest.importorskip("torch", reason=TORCH_SKIP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_torch_matches_predict_and_comes_back_exactly(rng, dtype):
    torch = _torch()
    net = random_net(rng, ACTIVATIONS, dtype, alpha=0.3)
    module = gpubp.export.to_torch(net)
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [p["W"].shape for p in net.get_params()]   # (out, in)
    assert [m.negative_slope for m in module if isinstance(m, torch.nn.LeakyReLU)] == [0.3]
    X = rng.standard_normal((7, net.n_in)).astype(dtype)
    with torch.no_grad():
        out = module(torch.from_numpy(X)).numpy()
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out, net.predict(X), **TOL[dtype])
    back = gpubp.export.from_torch(module, backend="numpy")
    assert back.dtype == net.dtype and [repr(l) for l in back.layers] == [repr(l) for l in net.layers]
    assert [l.alpha for l in back.layers if l.activation == "leaky_relu"] == [0.3]
    for mine, theirs in zip(back.get_params(), net.get_params()):
        for name in theirs:
            np.testing.assert_array_equal(mine[name], theirs[name])


def test_from_torch_takes_a_torch_model(rng):
    torch = _torch()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LeakyReLU(0.05)),
                                 torch.nn.Identity(), torch.nn.Linear(6, 3, bias=False), torch.nn.Tanh(),
                                 torch.nn.Linear(3, 2))
    net = gpubp.export.from_torch(module, backend="numpy", dtype="float64")
    assert [(l.activation, l.bias) for l in net.layers] == [("leaky_relu", True), ("tanh", False), ("identity", True)]
    assert net.layers[0].alpha == pytest.approx(0.05)
    X = rng.standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(net.predict(X), expected, rtol=1e-5, atol=1e-6)
    single = gpubp.export.from_torch(torch.nn.Linear(3, 2), backend="numpy")
    assert single.dtype == np.float32 and len(single.layers) == 1


@pytest.mark.parametrize("make, error, match", [
    (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)), TypeError, "Dropout at position 1"),
    (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1)), TypeError, "Softmax"),
    (lambda nn: nn.Sequential(nn.Conv1d(1, 1, 3)), TypeError, "Conv1d"),
    (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), TypeError, "BatchNorm1d"),
    (lambda nn: nn.Sequential(nn.ReLU(), nn.Linear(3, 4)), TypeError, "ReLU at position 0 comes before"),
    (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh()), TypeError, "Tanh at position 2 follows"),
    (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 1)), ValueError, "expects 5 inputs"),
    (lambda nn: nn.Sequential(), ValueError, "no nn.Linear"),
    (lambda nn: nn.Linear(3, 4).half(), ValueError, "dtype"),
    (lambda nn: "module", TypeError, "torch.nn.Module"),
], ids=["dropout", "softmax", "conv", "batchnorm", "activation-first", "two-activations", "mismatch", "empty",
        "half", "not-a-module"])
def test_from_torch_refuses_what_it_cannot_represent(make, error, match):
    torch = _torch()
    with pytest.raises(error, match=match):
        gpubp.export.from_torch(make(torch.nn), backend="numpy")
