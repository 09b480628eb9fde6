"""Fuzzing the public API with random and malformed arguments (hypothesis): Dense, Sequential, SGD, Adam,
train_step, predict, gradients, evaluate, set_params, fit and load. Only ValueError, TypeError and
FloatingPointError may come out (and FileNotFoundError from load of a path that is not a file), and a call that
raises leaves the model exactly as it was: parameters bit for bit, optimizer state, step counters, the
shuffling generator. Calls that only read (predict, gradients, evaluate) never change the model at all."""
import json
import os
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpubp
from conftest import SIMULATOR

ALLOWED = (ValueError, TypeError, FloatingPointError)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# ---- what the fuzzer throws ---------------------------------------------------------------------------------------
@st.composite
def weird_arrays(draw, shape=None):
    """Arrays of awkward dtypes and shapes, values normal, huge, NaN or inf."""
    shape = shape if shape is not None else tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    kind = draw(st.sampled_from(["float64", "float32", "float16", "int64", "uint8", "bool", "complex128",
                                 "U3", "datetime64[s]", "object", "f4,f4"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e10, 1e36, 1e300]))
    if values.size and draw(st.booleans()):
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if kind == "object":
        return values.astype(object)
    if kind == "f4,f4":
        return np.zeros(shape, kind)
    with np.errstate(all="ignore"):
        return values.astype(kind) if kind[0] in "fc" else np.abs(np.nan_to_num(values) % 100).astype(kind)


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.just(10**400), st.floats(), st.text(max_size=4),
    st.binary(max_size=4),
    st.just(object()), st.just(np.float32(np.nan)), st.just(np.int64(-1)), st.just(gpubp.Dense),
    st.lists(st.integers(-3, 3), max_size=4), st.tuples(st.integers(), st.floats()),
    st.dictionaries(st.text(max_size=2), st.integers(-2, 2), max_size=2),
    st.lists(st.lists(st.floats(-2, 2), max_size=3), max_size=3),     # nested, maybe ragged
    weird_arrays(),
)


def near(valid, junk=JUNK):
    """Mostly arguments close to valid, often plainly valid, sometimes anything at all."""
    return st.one_of(valid, junk)


KINDS = {"mse": ("tanh", "mse"), "bce": ("sigmoid", "bce"), "softmax_ce": ("identity", "softmax_ce")}


def valid_batch(kind, N, rng):
    """X (N, 3) and targets y that suit the loss of a model of `kind`, in one of the accepted forms; X is
    sometimes so large that the step overflows (a FloatingPointError, or fit stopping)."""
    X = rng.standard_normal((N, 3)) * rng.choice([1.0, 1.0, 1e18, 1e36])
    if kind == "softmax_ce":
        labels = rng.integers(0, 3, N)
        y = labels if rng.random() < 0.5 else np.eye(3)[labels]
    elif kind == "bce":
        y = rng.random((N, 3))
    else:
        y = rng.standard_normal((N, 3)).astype(np.float32)
    return X, y


@st.composite
def bad_X(draw, N):
    width = draw(st.sampled_from([3, 3, 2, 4, 0]))
    return draw(st.one_of(weird_arrays((draw(st.sampled_from([N, N, N + 1, 0])), width)), JUNK))


@st.composite
def bad_y(draw, N):
    rows = draw(st.sampled_from([N, N, N - 1, N + 1]))
    rng = np.random.default_rng(rows)
    return draw(st.one_of(
        st.just(rng.integers(-1, 4, rows)),                      # labels, maybe out of [0, 3)
        st.just(rng.standard_normal((rows, 3)) * 2),            # floats, maybe outside bce's [0, 1]
        weird_arrays((rows,)), weird_arrays((rows, draw(st.sampled_from([3, 2, 4])))), JUNK))


@st.composite
def call_args(draw, kind, extra=None):
    """{"X", "y", "loss", ...}: valid for a model of `kind`, then some of them (often none) swapped for malformed
    ones, so that both the paths that succeed and the paths that refuse are fuzzed."""
    N = draw(st.integers(1, 6))
    X, y = valid_batch(kind, N, np.random.default_rng(draw(st.integers(0, 2**16))))
    valid = {"X": st.just(X), "y": st.just(y), "loss": st.just(kind)}
    bad = {"X": bad_X(N), "y": bad_y(N), "loss": st.one_of(st.sampled_from(list(KINDS)), JUNK)}
    for name, (good, malformed) in (extra or {}).items():
        valid[name], bad[name] = good, malformed
    broken = draw(st.sampled_from([(), (), ()] + [(name,) for name in bad] + [tuple(bad)]))
    return {name: draw(bad[name] if name in broken else valid[name]) for name in valid}


# ---- the model under attack, and what must not change -----------------------------------------------------------
def trained_model(backend_name, kind):
    """A small model with history (non-zero momentum, steps) and the loss it trains on."""
    output, loss = KINDS[kind]
    net = gpubp.Sequential(gpubp.Dense(3, 4, "relu"), gpubp.Dense(4, 3, output), backend=backend_name,
                           dtype="float32", seed=5)
    opt = gpubp.SGD(net, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 3))
    y = {"mse": rng.standard_normal((6, 3)), "bce": rng.random((6, 3)), "softmax_ce": rng.integers(0, 3, 6)}[loss]
    for _ in range(2):
        net.train_step(X, y, loss, opt)
    return net, opt


def snapshot(net):
    state = {"params": net.backend.to_numpy(net.params).tobytes(), "steps": net.steps, "optimizer": net.optimizer,
             "rng": json.dumps(net.rng.bit_generator.state)}
    if net.optimizer is not None:
        state.update({"opt." + k: v.tobytes() for k, v in net.optimizer.state_arrays().items()})
    return state


def attempt(call):
    """Run call(); True when it succeeded, False when it raised an allowed exception; anything else fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", "fit stopped", RuntimeWarning)   # fit's own, by design
            call()
        return True
    except ALLOWED:
        return False


def examples(backend_name, full):
    return settings(FUZZ, max_examples=10 if backend_name == "numba" and SIMULATOR else full)


# ---- constructors ---------------------------------------------------------------------------------------------------
@FUZZ
@given(n_in=near(st.integers(1, 5)), n_out=near(st.integers(1, 5)),
       activation=near(st.sampled_from(["identity", "relu", "leaky_relu", "sigmoid", "tanh"])),
       bias=near(st.booleans()), alpha=near(st.floats(-1, 1)))
def test_fuzz_dense(n_in, n_out, activation, bias, alpha):
    attempt(lambda: gpubp.Dense(n_in, n_out, activation, bias=bias, alpha=alpha))


@FUZZ
@given(layers=st.lists(near(st.builds(gpubp.Dense, st.integers(1, 4), st.just(3))), min_size=0, max_size=3),
       backend=near(st.sampled_from(["numpy", "auto"])),
       dtype=near(st.sampled_from(["float32", "float64", np.float32, np.dtype("float64"), "f4", "float16", "int32"])),
       seed=near(st.integers(0, 2**64)), deterministic=near(st.booleans()), as_list=st.booleans())
def test_fuzz_sequential(layers, backend, dtype, seed, deterministic, as_list):
    args = [layers] if as_list else layers
    attempt(lambda: gpubp.Sequential(*args, backend=backend, dtype=dtype, seed=seed, deterministic=deterministic))


@FUZZ
@given(data=st.data())
def test_fuzz_optimizers(data):
    net, opt = trained_model("numpy", "mse")
    before = snapshot(net)
    which = data.draw(st.sampled_from(["sgd", "adam"]))
    target = data.draw(near(st.just(net)))
    number = near(st.floats(0, 1, exclude_min=True))
    if which == "sgd":
        kw = data.draw(st.fixed_dictionaries({}, optional={
            "lr": number, "momentum": number, "weight_decay": number, "dampening": number,
            "nesterov": near(st.booleans())}))
        ok = attempt(lambda: gpubp.SGD(target, **kw))
    else:
        kw = data.draw(st.fixed_dictionaries({}, optional={
            "lr": number, "eps": number, "weight_decay": number,
            "betas": near(st.tuples(st.floats(0, 1), st.floats(0, 1)))}))
        ok = attempt(lambda: gpubp.Adam(target, **kw))
    if not ok:
        assert snapshot(net) == before


# ---- the model's methods --------------------------------------------------------------------------------------------
def check_unchanged_unless_ok(net, call, mutates):
    before = snapshot(net)
    ok = attempt(call)
    if not ok or not mutates:
        assert snapshot(net) == before, "a call that raised (or only reads) changed the model"
    return ok


def test_fuzz_train_step(backend_name):
    @examples(backend_name, 300)
    @given(data=st.data(), kind=st.sampled_from(list(KINDS)))
    def fuzz(data, kind):
        net, opt = trained_model(backend_name, kind)
        other = gpubp.SGD(gpubp.Sequential(gpubp.Dense(3, 3), backend="numpy"))
        a = data.draw(call_args(kind, {"optimizer": (st.sampled_from([opt, None]), st.one_of(st.just(other), JUNK))}))
        check_unchanged_unless_ok(net, lambda: net.train_step(a["X"], a["y"], a["loss"], a["optimizer"]), mutates=True)
    fuzz()


def test_fuzz_reading_calls(backend_name):
    @examples(backend_name, 300)
    @given(data=st.data(), kind=st.sampled_from(list(KINDS)), method=st.sampled_from(["predict", "gradients", "evaluate"]))
    def fuzz(data, kind, method):
        net, _ = trained_model(backend_name, kind)
        a = data.draw(call_args(kind, {"batch_size": (st.one_of(st.none(), st.integers(1, 7)), JUNK)}))
        call = {"predict": lambda: net.predict(a["X"], batch_size=a["batch_size"]),
                "gradients": lambda: net.gradients(a["X"], a["y"], a["loss"]),
                "evaluate": lambda: net.evaluate(a["X"], a["y"], a["loss"])}[method]
        check_unchanged_unless_ok(net, call, mutates=False)
    fuzz()


@st.composite
def param_lists(draw):
    """Lists shaped like get_params() of trained_model, with any part swapped for something malformed."""
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    good = [{"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(4)},
            {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(3)}]
    how = draw(st.sampled_from(["valid", "valid", "value", "value", "key", "entry", "length", "whole"]))
    i, name = draw(st.integers(0, 1)), draw(st.sampled_from(["W", "b"]))
    if how == "value":
        good[i][name] = draw(st.one_of(weird_arrays(good[i][name].shape), JUNK))
    elif how == "key":
        good[i][draw(JUNK.filter(lambda k: isinstance(k, (str, int, bytes, float, type(None)))))] = good[i].pop(name)
    elif how == "entry":
        good[i] = draw(JUNK)
    elif how == "length":
        good = good[:draw(st.integers(0, 1))] + ([good[0]] * draw(st.integers(0, 2)))
    else:
        good = draw(JUNK)
    return good if draw(st.booleans()) else (tuple(good) if isinstance(good, list) else good)


def test_fuzz_set_params(backend_name):
    @examples(backend_name, 300)
    @given(params=param_lists())
    def fuzz(params):
        net, _ = trained_model(backend_name, "mse")
        check_unchanged_unless_ok(net, lambda: net.set_params(params), mutates=True)
    fuzz()


def test_fuzz_fit(backend_name):
    @examples(backend_name, 150)
    @given(data=st.data(), kind=st.sampled_from(list(KINDS)))
    def fuzz(data, kind):
        net, opt = trained_model(backend_name, kind)
        Xv, yv = valid_batch(kind, 3, np.random.default_rng(9))
        a = data.draw(call_args(kind, {
            "epochs": (st.integers(1, 2), JUNK), "batch_size": (st.integers(1, 8), JUNK),
            "shuffle": (st.booleans(), JUNK),
            "validation_data": (st.sampled_from([None, (Xv, yv)]),
                                st.one_of(JUNK, st.tuples(bad_X(3), st.just(yv)), st.tuples(st.just(Xv), bad_y(3)))),
            # Callables from JUNK (gpubp.Dense) would raise from inside training: the caller's own error.
            "on_epoch_end": (st.sampled_from([None, lambda epoch, logs: None]), JUNK.filter(lambda v: not callable(v))),
            "on_batch_end": (st.sampled_from([None, lambda b, n, value: None]), JUNK.filter(lambda v: not callable(v)))}))
        check_unchanged_unless_ok(net, lambda: net.fit(
            a["X"], a["y"], a["loss"], opt, epochs=a["epochs"], batch_size=a["batch_size"], shuffle=a["shuffle"],
            validation_data=a["validation_data"], on_epoch_end=a["on_epoch_end"], on_batch_end=a["on_batch_end"]),
            mutates=True)
    fuzz()


# ---- load -------------------------------------------------------------------------------------------------------------
@FUZZ
@given(path=JUNK)
def test_fuzz_load_path_argument(path):
    try:
        attempt(lambda: gpubp.load(path, backend="numpy"))
    except FileNotFoundError:
        pass


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "good.npz"
    net, _ = trained_model("numpy", "softmax_ce")
    net.save(path)
    return path


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzz_load_corrupted_bytes(good_file, tmp_path_factory, data):
    raw = bytearray(good_file.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "zero run"]))
        at = data.draw(st.integers(0, len(raw) - 1))
        if how == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "cut":
            del raw[at:at + data.draw(st.integers(1, 200))]
        elif how == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            raw[at:at + 64] = bytes(len(raw[at:at + 64]))
        if not raw:
            break
    path = tmp_path_factory.mktemp("bad") / "bad.npz"
    path.write_bytes(bytes(raw))
    if attempt(lambda: gpubp.load(path, backend="numpy")):
        gpubp.load(path, backend="numpy").predict(np.ones((2, 3)))     # what loads must also work


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)


def mutate(meta, data):
    """Replace one value somewhere in the metadata tree (or drop its key) with random JSON."""
    node = meta
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and data.draw(st.integers(0, 4)) == 0:
            del node[key]
        else:
            node[key] = data.draw(JSON_VALUES)
        return


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzz_load_metadata(good_file, tmp_path_factory, data):
    with zipfile.ZipFile(good_file) as z:
        members = {name: z.read(name) for name in z.namelist()}
    with np.load(good_file, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(meta, data)
    from io import BytesIO
    buf = BytesIO()
    np.lib.format.write_array(buf, np.array(json.dumps(meta)))
    members["meta.npy"] = buf.getvalue()
    path = tmp_path_factory.mktemp("meta") / "bad.npz"
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    if attempt(lambda: gpubp.load(path, backend="numpy")):
        net = gpubp.load(path, backend="numpy")
        net.predict(np.ones((2, net.n_in)))
    os.unlink(path)
