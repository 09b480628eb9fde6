"""The training loop that never waits for the host (gpubp/guard.py), on every backend (cupy on the CPU emulator
through tests/test_cupy_kernels_emulated.py, numba under the simulator):

- fit reads the device a fixed number of times per epoch, however many batches it has, and its host-to-device
  copies do not grow with the number of batches (the backends count both);
- train_step(sync=False) never synchronises; float() of its LazyLoss does, once;
- a fault planted mid-epoch (a row that overflows in batch 7; a learning rate that overflows at step 12) is
  reported at the next read, naming that step, with the parameters of the last good step;
- fit gives, bit for bit on numpy, what the step-by-step loop of public train_step calls gives;
- validation adds one read per epoch (the set uploaded once per fit), with numpy's accuracy bit for bit;
- steps_per_graph=k gives the run of single steps bit for bit, and is refused where the host is needed between
  steps (comm, a per-step learning-rate schedule).
"""
import numpy as np
import pytest

import gpubp
from conftest import pick_sizes
from gpubp import guard as G
from helpers import make_data, make_net


def _net(backend_name, loss="softmax_ce", sizes=(5, 8, 3), dtype="float32", seed=0):
    return make_net(list(sizes), hidden="relu", loss=loss, backend=backend_name, dtype=dtype, seed=seed)


def _counted(net, fn):
    """The backend's counters' increase while fn() runs."""
    before = dict(net.backend.counters)
    fn()
    return {k: net.backend.counters[k] - before[k] for k in before}


@pytest.mark.parametrize("loss", ["softmax_ce", "bce", "mse"])
def test_fit_reads_the_device_a_fixed_number_of_times_per_epoch(backend_name, loss, rng):
    n_out = 3 if loss != "bce" else 1
    counts = {}
    epochs = pick_sizes(2, 1)
    for n_batches in pick_sizes((20, 40), (3, 6)):
        batch = 4
        X, y = make_data(rng, n_batches * batch - 1, 5, n_out, loss)    # a short last batch too
        net = _net(backend_name, loss=loss, sizes=(5, 8, n_out))
        opt = gpubp.SGD(net, lr=0.01, momentum=0.9)
        counts[n_batches] = _counted(net, lambda: net.fit(X, y, loss, opt, epochs=epochs, batch_size=batch))
        assert net.steps == epochs * n_batches
    few, many = counts.values()
    assert few["d2h"] == many["d2h"] <= 2 * epochs + 1     # at most 2 per epoch (+1: fit's first read)
    assert few["sync"] == many["sync"]
    assert few["h2d"] == many["h2d"]


def test_check_every_and_log_every_add_reads_where_asked(backend_name, rng):
    X, y = make_data(rng, 20, 5, 3, "softmax_ce")
    net = _net(backend_name)
    opt = gpubp.SGD(net, lr=0.01)
    plain = _counted(net, lambda: net.fit(X, y, "softmax_ce", opt, epochs=1, batch_size=2))
    checked = _counted(net, lambda: net.fit(X, y, "softmax_ce", opt, epochs=1, batch_size=2, check_every=3))
    assert checked["d2h"] - plain["d2h"] == 3            # after batches 3, 6, 9 (batch 10 ends the epoch anyway)
    seen = []
    logged = _counted(net, lambda: net.fit(X, y, "softmax_ce", opt, epochs=1, batch_size=2, log_every=5,
                                           on_batch_end=lambda b, n, value: seen.append((b, n, value))))
    assert [(b, n) for b, n, _ in seen] == [(4, 10), (9, 10)] and logged["d2h"] == plain["d2h"] + 1
    assert all(isinstance(v, float) and np.isfinite(v) for _, _, v in seen)


@pytest.mark.parametrize("loss", pick_sizes(["softmax_ce", "bce"], ["softmax_ce"]))   # (bce's: the next test)
def test_validation_adds_one_read_per_epoch(backend_name, loss, rng):
    """The validation set goes to the device once per fit; each epoch's val_loss and val_accuracy come back in
    one read (the evaluation guard's head), the values evaluate() gives."""
    n_out = 3 if loss == "softmax_ce" else 2
    X, y = make_data(rng, pick_sizes(12, 4), 5, n_out, loss)
    Xv, yv = make_data(rng, 7, 5, n_out, loss)
    added = {}
    few, many = pick_sizes((1, 3), (1, 2))
    for epochs in (few, many):
        plain_net, val_net = (_net(backend_name, loss=loss, sizes=(5, 8, n_out), seed=3) for _ in range(2))
        plain = _counted(plain_net, lambda: plain_net.fit(X, y, loss, gpubp.SGD(plain_net, lr=0.05), epochs=epochs,
                                                          batch_size=4))
        history = {}
        checked = _counted(val_net, lambda: history.update(val_net.fit(
            X, y, loss, gpubp.SGD(val_net, lr=0.05), epochs=epochs, batch_size=4, validation_data=(Xv, yv))))
        added[epochs] = {k: checked[k] - plain[k] for k in checked}
        assert added[epochs]["d2h"] == epochs
        assert added[epochs]["sync"] == (0 if backend_name == "numpy" else epochs)   # numpy never waits
    # uploads: the set once per fit (no growth with the epochs; numpy counts its guard reset, a copy, as one)
    assert added[many]["h2d"] - added[few]["h2d"] <= (many - few if backend_name == "numpy" else 0)
    val_loss, val_accuracy = val_net.evaluate(Xv, yv, loss)
    assert (history["val_loss"][-1], history["val_accuracy"][-1]) == (val_loss, val_accuracy)
    if backend_name == "numpy":
        A = val_net.predict(Xv)
        targets = np.eye(n_out)[yv] if loss == "softmax_ce" else yv
        assert val_accuracy == gpubp.losses.accuracy(gpubp.losses.loss_id(loss), A, targets)


def test_evaluation_accuracy_is_numpys_bit_for_bit(backend_name, rng):
    """The device keeps the accuracy as (count / compared)·rows; the count read back from it gives numpy's
    count / compared exactly, also where (c / 33)·11 / 11 is not c / 33 in float64 (c = 1, 2, 4, 8, 16, 25, 32)."""
    net = _net(backend_name, loss="bce", sizes=(5, 4, 3))
    Xv = rng.standard_normal((11, 5))
    right = (net.predict(Xv) > 0.5).astype(float)              # targets every output predicts right
    for count in (0, 1, 2, 4, 8, 16, 25, 32, 33):
        yv = right.copy()
        yv.reshape(-1)[count:] = 1 - yv.reshape(-1)[count:]      # the first `count` elements stay right
        assert net.evaluate(Xv, yv, "bce")[1] == count / 33


def test_steps_per_graph_gives_the_run_of_single_steps(backend_name, rng):
    """fit(steps_per_graph=3): up to 3 consecutive full batches as one step closure (one captured graph on
    cupy), groups cut where the host reads (check_every 4, log_every 5, the epoch's end) and before the short
    last batch: the same History, parameters and optimizer state as steps_per_graph=1, bit for bit, with the
    same reads, and the callbacks told of the same batches."""
    rows, epochs = pick_sizes((39, 2), (19, 1))    # 10 batches of 4 (5 under the simulator), the last short
    X, y = make_data(rng, rows, 5, 3, "softmax_ce")
    Xv, yv = make_data(rng, 6, 5, 3, "softmax_ce")
    runs = []
    for steps_per_graph in (1, 3):
        net = _net(backend_name, seed=5)
        opt = gpubp.Adam(net, lr=gpubp.schedules.Cosine(1e-2, total=epochs + 1))   # per epoch: allowed
        seen = []
        counted = _counted(net, lambda: runs.append(net.fit(
            X, y, "softmax_ce", opt, epochs=epochs, batch_size=4, validation_data=(Xv, yv), check_every=4,
            log_every=5, on_batch_end=lambda b, n, value: seen.append((b, n, value)),
            steps_per_graph=steps_per_graph)))
        runs[-1] = (dict(runs[-1]), _state(net, opt), seen, counted["d2h"], net.steps)
    (history, state, seen, reads, steps), grouped = runs
    assert grouped[0] == history and grouped[2:] == (seen, reads, steps) and seen
    for a, b in zip(grouped[1], state):
        np.testing.assert_array_equal(a, b)


def test_steps_per_graph_refuses_what_needs_the_host_between_steps():
    from gpubp.distributed import Communicator
    net = _net("numpy")
    X, y = np.ones((8, 5)), np.zeros(8, np.int64)
    with pytest.raises(ValueError, match="steps_per_graph: expected a positive integer, got 0"):
        net.fit(X, y, "softmax_ce", gpubp.SGD(net, lr=0.1), steps_per_graph=0)
    per_step = gpubp.SGD(net, lr=gpubp.schedules.Cosine(0.1, total=4, per="step"))
    with pytest.raises(ValueError, match="steps_per_graph=2: not with a per-step learning-rate schedule"):
        net.fit(X, y, "softmax_ce", per_step, steps_per_graph=2)
    comm = Communicator(size=2)
    comm.transport = object()    # what a job of two ranks has; nothing is sent before the check
    with pytest.raises(ValueError, match="steps_per_graph=4: not with comm"):
        net.fit(X, y, "softmax_ce", gpubp.SGD(net, lr=0.1), comm=comm, steps_per_graph=4)
    assert net.steps == 0


def test_a_user_loop_with_sync_false_never_synchronises(backend_name, rng):
    X, y = make_data(rng, 16, 5, 3, "softmax_ce")
    net = _net(backend_name)
    opt = gpubp.Adam(net, lr=1e-3)
    Xd = net.backend.asarray(X, net.dtype)
    yd = net.backend.asarray(y, np.int64)
    net.train_step(Xd, yd, "softmax_ce", opt)             # warm-up: compiles, allocates, captures
    lazy, steps = [], pick_sizes(10, 4)
    counted = _counted(net, lambda: lazy.extend(net.train_step(Xd, yd, "softmax_ce", opt, sync=False)
                                                for _ in range(steps)))
    assert counted == {"sync": 0, "d2h": 0, "h2d": 0}
    read = _counted(net, lambda: float(lazy[3]))
    assert read["d2h"] == 1
    assert net.steps == steps + 1 and repr(lazy[0]) == "LazyLoss(train step 1)"
    # the lazy losses are the losses the synchronous loop returns
    twin = _net(backend_name)
    twin_opt = gpubp.Adam(twin, lr=1e-3)
    expected = [twin.train_step(X, y, "softmax_ce", twin_opt) for _ in range(steps + 1)]
    np.testing.assert_allclose([float(v) for v in lazy], expected[1:], rtol=1e-6)


def test_a_lazy_loss_too_old_to_read_says_so():
    net = _net("numpy")
    opt = gpubp.SGD(net, lr=1e-3)
    X, y = np.ones((2, 5)), np.array([0, 1])
    first = net.train_step(X, y, "softmax_ce", opt, sync=False)
    for _ in range(G.RING_SIZE):
        net.train_step(X, y, "softmax_ce", opt, sync=False)
    with pytest.raises(ValueError, match="no longer kept"):
        float(first)


def _state(net, opt):
    return [net.backend.to_numpy(net.params)] + [v for v in opt.state_arrays().values()]


def test_an_overflowing_row_in_batch_7_is_reported_at_the_epoch_end(backend_name, rng):
    # NaN inputs are refused up front (ValueError, the model untouched), so the planted fault is a finite row
    # whose products overflow float32 (MSE through identity layers: δ ~ 1e30, dW ~ 1e60): batch 7's loss or
    # gradients are not finite.
    batch, n_batches = 3, pick_sizes(20, 12)
    X, y = make_data(rng, batch * n_batches, 5, 3, "mse")
    X[7 * batch + 1] = 1e30

    def make():
        net = make_net([5, 8, 3], hidden="identity", loss="mse", backend=backend_name, dtype="float32")
        return net, gpubp.SGD(net, lr=0.01, momentum=0.9)

    net, opt = make()
    twin, twin_opt = make()                                # the same model, stopped by hand after batch 6
    for b in range(7):
        twin.train_step(X[b * batch:(b + 1) * batch], y[b * batch:(b + 1) * batch], "mse", twin_opt)
    with pytest.warns(RuntimeWarning, match=r"fit stopped: epoch 1, batch 8 of \d+: train step 7: the (loss|gradient of "
                                            r"layer \d)"):
        history = net.fit(X, y, "mse", opt, epochs=3, batch_size=batch, shuffle=False)
    assert f"({n_batches - 8} later steps of the same check interval skipped)" in history.stop_reason
    assert net.steps == 7 and opt.steps_taken == 7 and history["loss"] == []
    for a, b in zip(_state(net, opt), _state(twin, twin_opt)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the model goes on from there
    net.train_step(X[:batch], y[:batch], "mse", opt)
    assert net.steps == 8


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_learning_rate_that_overflows_mid_loop_is_reported_at_the_next_read(backend_name, optimizer, rng):
    # step 12 of 16 (step 4 of 8 under the simulator, where each step costs a fraction of a second)
    bad, total = pick_sizes((12, 16), (4, 8))
    X, y = make_data(rng, 6, 5, 3, "softmax_ce")
    net = _net(backend_name, sizes=(5, 4, 3))
    make_opt = (lambda n: gpubp.SGD(n, lr=0.05)) if optimizer == "sgd" else (lambda n: gpubp.Adam(n, lr=0.01))
    opt = make_opt(net)
    kept = None
    for step in range(total):
        if step == bad:
            kept = _state(net, opt)
            opt.lr = 1e300      # inf in float32: the update overflows; the settings live on the device (no recapture)
        net.train_step(X, y, "softmax_ce", opt, sync=False)
    with pytest.raises(FloatingPointError, match=rf"train step {bad}: the update made the parameters of layer \d.*"
                                                 rf"\({total - bad - 1} later steps of the same check interval skipped\)"):
        net.sync()
    assert net.steps == bad and opt.steps_taken == bad
    for a, b in zip(_state(net, opt), kept):
        np.testing.assert_array_equal(a, b)
    opt.lr = 0.01                                           # lower the learning rate and carry on
    net.train_step(X, y, "softmax_ce", opt)
    assert net.steps == bad + 1


@pytest.mark.parametrize("loss", ["softmax_ce", "bce", "mse"])
def test_fit_equals_the_loop_of_public_train_steps(backend_name, loss, rng):
    """The same seed gives the same History and parameters as the host loop fit used to run: bit for bit on
    numpy, within rounding on the GPU backends (whose sums are ordered differently)."""
    n_out = 1 if loss == "bce" else 3
    rows, epochs = pick_sizes((45, 3), (21, 2))
    X, y = make_data(rng, rows, 5, n_out, loss)
    Xv, yv = make_data(rng, 9, 5, n_out, loss)
    net = _net(backend_name, loss=loss, sizes=(5, 8, n_out), seed=4)
    history = net.fit(X, y, loss, gpubp.Adam(net, lr=1e-2), epochs=epochs, batch_size=8, validation_data=(Xv, yv))

    ref = _net(backend_name, loss=loss, sizes=(5, 8, n_out), seed=4)
    opt = gpubp.Adam(ref, lr=1e-2)
    targets = np.eye(n_out)[y] if loss == "softmax_ce" else y
    expected = {}
    for epoch in range(epochs):
        order = ref.rng.permutation(len(X))
        total_loss = total_correct = 0.0
        for b in range(0, len(X), 8):
            idx = order[b:b + 8]
            prediction = ref.predict(X[idx])                 # before the update: Keras-style running accuracy
            total_loss += ref.train_step(X[idx], y[idx], loss, opt) * len(idx)
            accuracy = gpubp.losses.accuracy(gpubp.losses.loss_id(loss), prediction, targets[idx])
            total_correct += (accuracy or 0.0) * len(idx)
        logs = {"loss": total_loss / len(X)}
        if loss != "mse":
            logs["accuracy"] = total_correct / len(X)
        logs["val_loss"], val_accuracy = ref.evaluate(Xv, yv, loss)
        if val_accuracy is not None:
            logs["val_accuracy"] = val_accuracy
        for k, v in logs.items():
            expected.setdefault(k, []).append(v)
    assert sorted(history) == sorted(expected)
    if backend_name == "numpy":
        assert dict(history) == expected
        np.testing.assert_array_equal(net.backend.to_numpy(net.params), ref.backend.to_numpy(ref.params))
    else:
        for k in expected:
            np.testing.assert_allclose(history[k], expected[k], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(net.backend.to_numpy(net.params), ref.backend.to_numpy(ref.params),
                                   rtol=1e-4, atol=1e-6)


def test_fit_takes_device_arrays_in_place(backend_name, rng):
    X, y = make_data(rng, 30, 5, 3, "softmax_ce")
    net = _net(backend_name)
    opt = gpubp.SGD(net, lr=0.05)
    Xd, yd = net.backend.asarray(X, net.dtype), net.backend.asarray(y, np.int64)
    on_device = _counted(net, lambda: net.fit(Xd, yd, "softmax_ce", opt, epochs=1, batch_size=7))
    twin = _net(backend_name)
    twin.fit(X, y, "softmax_ce", gpubp.SGD(twin, lr=0.05), epochs=1, batch_size=7)
    np.testing.assert_array_equal(net.backend.to_numpy(net.params), twin.backend.to_numpy(twin.params))
    assert on_device["h2d"] <= 3     # the order buffer, the guard reset (and the labels' first check)


def test_optimizer_settings_other_than_lr_are_fixed():
    net = _net("numpy")
    opt = gpubp.SGD(net, lr=0.1, momentum=0.9)
    with pytest.raises(AttributeError, match="only lr may change"):
        opt.momentum = 0.5
    with pytest.raises(ValueError, match="SGD lr"):
        opt.lr = -1.0
    assert opt.lr == 0.1 and list(net.backend.to_numpy(opt.hyper)) == [0.1, 0.9, 0.0, 0.0, 0.0]
    opt.lr = 0.2
    assert list(net.backend.to_numpy(opt.hyper)) == [0.2, 0.9, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("loss", ["softmax_ce", "mse"])
def test_data_above_the_device_share_is_streamed_in_chunks_with_the_same_result(backend_name, loss, rng,
                                                                                   monkeypatch):
    n_out = 3
    rows, epochs = pick_sizes((53, 3), (21, 1))     # chunks of 8 rows (2 batches): 7 or 3 a epoch
    chunks = -(-rows // 8)
    X, y = make_data(rng, rows, 5, n_out, loss)
    Xv, yv = make_data(rng, 7, 5, n_out, loss)

    def run(free_bytes):
        net = _net(backend_name, loss=loss, sizes=(5, 8, n_out), seed=2)
        monkeypatch.setattr(net.backend, "free_memory", lambda: free_bytes)
        if net.backend.is_device_array(X):   # numpy's (and the CPU emulator's) device arrays are numpy arrays,
            monkeypatch.setattr(net.backend, "is_device_array", lambda x: False)   # never streamed: pretend not
        opt = gpubp.SGD(net, lr=0.05, momentum=0.9)
        counted = _counted(net, lambda: history.update(net.fit(X, y, loss, opt, epochs=epochs, batch_size=4,
                                                               validation_data=(Xv, yv))))
        return net, counted

    history = {}
    resident, resident_counts = run(None)
    expected = dict(history)
    history.clear()
    # 8 float32 values a row: 2 chunks of 2 batches fit in a budget of 0.5 * 1100 bytes
    streamed, streamed_counts = run(1100)
    assert history == expected if backend_name == "numpy" else history.keys() == expected.keys()
    np.testing.assert_allclose(streamed.backend.to_numpy(streamed.params), resident.backend.to_numpy(resident.params),
                               rtol=0 if backend_name == "numpy" else 1e-5, atol=0 if backend_name == "numpy" else 1e-6)
    assert streamed_counts["d2h"] == resident_counts["d2h"]              # the reads do not change
    if resident_counts["h2d"]:   # (the CPU emulator's uploads are numpy copies it does not count)
        assert streamed_counts["h2d"] - resident_counts["h2d"] >= 3 * (chunks * epochs - 1) - 2   # X, Y, order


def test_a_device_array_is_never_streamed(monkeypatch, rng):
    from gpubp.network import DeviceData
    net = _net("numpy")
    monkeypatch.setattr(net.backend, "free_memory", lambda: 10)
    X, y = make_data(rng, 40, 5, 3, "softmax_ce")
    assert DeviceData(net, X, y, 2, 4, gpubp.SGD(net, lr=0.1)).streamed is False   # numpy arrays are its device's


def test_sync_false_leaves_device_inputs_to_the_guard(backend_name, rng):
    """A sync=False step does not read a device array back to check it: a NaN in X or a label out of range
    becomes a fault of that step (the label a one-hot row of NaN), reported at the next read, with the
    parameters of the last good step. NumPy inputs (the numpy backend's and the CPU emulator's "device" arrays
    too) are still checked at once: ValueError, nothing launched."""
    X, y = make_data(rng, 6, 5, 3, "softmax_ce")
    net = _net(backend_name)
    opt = gpubp.SGD(net, lr=0.05)
    put = lambda a, dtype: net.backend.asarray(a, dtype)   # noqa: E731
    net.train_step(put(X, net.dtype), put(y, np.int64), "softmax_ce", opt)
    kept = _state(net, opt)
    bad_X, bad_y = X.copy(), y.copy()
    bad_X[2, 1] = np.nan
    bad_y[4] = 3
    for X_in, y_in in ((put(bad_X, net.dtype), put(y, np.int64)), (put(X, net.dtype), put(bad_y, np.int64))):
        if isinstance(X_in, np.ndarray):
            with pytest.raises(ValueError, match="X: expected finite|y: class labels"):
                net.train_step(X_in, y_in, "softmax_ce", opt, sync=False)
        else:
            lazy = net.train_step(X_in, y_in, "softmax_ce", opt, sync=False)
            with pytest.raises(FloatingPointError, match="train step 1: the (loss|gradient)"):
                float(lazy)
        for a, b in zip(_state(net, opt), kept):
            np.testing.assert_array_equal(a, b)
    assert net.steps == 1
