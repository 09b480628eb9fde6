"""fit's callbacks (gpubp/callbacks.py): EarlyStopping (restores the best parameters bit for bit), ModelCheckpoint
(best only, atomic), stopping from a callback, an exception that keeps its History, the History's keys in every
case, verbose output without a read per step, and bad callback arguments refused before anything is touched."""
import os

import numpy as np
import pytest

import gpubp
from gpubp.callbacks import Callback, EarlyStopping, ModelCheckpoint
from helpers import assert_unchanged, make_data, make_net, snapshot


def _setup(rng, loss="softmax_ce", n=40):
    n_out = 1 if loss == "bce" else 3
    X, y = make_data(rng, n, 4, n_out, loss)
    net = make_net([4, 6, n_out], hidden="tanh", loss=loss, dtype="float32")
    return net, gpubp.SGD(net, lr=0.1, momentum=0.9), X, y


class Recorder(Callback):
    """Keeps each epoch's logs and parameters (flat copies)."""

    def on_train_begin(self, logs=None):
        self.logs, self.params_at = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(logs)
        self.params_at.append(self.model.backend.to_numpy(self.model.params).copy())


def test_early_stopping_stops_and_restores_the_best_parameters_bit_for_bit(rng):
    net, opt, X, y = _setup(rng)
    recorder = Recorder()
    # min_delta larger than any change: epoch 0 is the best, epochs 1 and 2 do not improve -> stop after epoch 2
    stopper = EarlyStopping(monitor="loss", patience=2, min_delta=1e6, restore_best_weights=True)
    history = net.fit(X, y, "softmax_ce", opt, epochs=10, batch_size=8, callbacks=[recorder, stopper])
    assert len(history["loss"]) == 3 and history.epoch == [0, 1, 2]
    assert stopper.stopped_epoch == 2 and stopper.best_epoch == 0
    assert history.stop_reason.startswith("early stopping: loss did not improve") and "(epoch 1)" in history.stop_reason
    assert not np.array_equal(recorder.params_at[2], recorder.params_at[0])      # training did move them
    final = net.backend.to_numpy(net.params)
    assert final.tobytes() == recorder.params_at[0].tobytes()                     # back to epoch 0, bit for bit


def test_early_stopping_runs_on_while_the_metric_improves(rng):
    net, opt, X, y = _setup(rng)
    stopper = EarlyStopping(monitor="loss", patience=1)
    history = net.fit(X, y, "softmax_ce", opt, epochs=4, batch_size=8, callbacks=[stopper])
    assert len(history["loss"]) == 4 and history.stop_reason is None and stopper.stopped_epoch is None
    assert stopper.best == min(history["loss"])


def test_monitor_direction_follows_the_metric_name():
    assert EarlyStopping("val_accuracy").mode == "max" and EarlyStopping("val_loss").mode == "min"
    assert EarlyStopping("val_accuracy", mode="min").mode == "min"


def test_model_checkpoint_keeps_the_best_epoch_atomically(rng, tmp_path):
    net, opt, X, y = _setup(rng)
    recorder = Recorder()
    saver = ModelCheckpoint(tmp_path / "best.npz", monitor="val_loss", save_best_only=True)
    history = net.fit(X, y, "softmax_ce", opt, epochs=4, batch_size=8, validation_data=(X[:10], y[:10]),
                      callbacks=[recorder, saver])
    best = int(np.argmin(history["val_loss"]))
    improving = [e for e in range(4) if history["val_loss"][e] == min(history["val_loss"][:e + 1])]
    assert len(saver.saved) == len(improving)
    loaded = gpubp.load(tmp_path / "best.npz", backend="numpy")
    assert loaded.backend.to_numpy(loaded.params).tobytes() == recorder.params_at[best].tobytes()
    assert sorted(os.listdir(tmp_path)) == ["best.npz"]          # no temporary file left behind
    every = ModelCheckpoint(str(tmp_path / "m-{epoch:02d}-{loss:.2f}.npz"), save_best_only=False)
    net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=8, callbacks=[every])
    assert [os.path.basename(p)[:5] for p in every.saved] == ["m-01-", "m-02-"]
    assert all(map(os.path.isfile, every.saved))


def test_a_callback_stops_training_by_answer_or_by_flag(rng):
    net, opt, X, y = _setup(rng)

    class StopAfterTwo(Callback):
        def on_epoch_end(self, epoch, logs=None):
            return "stop" if epoch == 1 else None

    history = net.fit(X, y, "softmax_ce", opt, epochs=5, batch_size=8, callbacks=[StopAfterTwo()])
    assert len(history["loss"]) == 2 and history.stop_reason == "StopAfterTwo stopped training after epoch 2"

    class StopMidEpoch(Callback):
        def on_batch_end(self, batch, logs=None):
            assert set(logs) == {"loss", "epoch_loss"}
            if batch == 1:
                self.model.stop_training = True

    steps = net.steps
    history = net.fit(X, y, "softmax_ce", opt, epochs=5, batch_size=8, callbacks=[StopMidEpoch()])
    assert net.steps == steps + 2 and len(history["loss"]) == 1       # the epoch's first two batches, recorded
    assert history.stop_reason == "StopMidEpoch set model.stop_training in epoch 1, batch 2; the epoch ended there"

    history = net.fit(X, y, "softmax_ce", opt, epochs=5, batch_size=8, on_epoch_end=lambda epoch, logs: "stop")
    assert len(history["loss"]) == 1 and history.stop_reason.endswith("stopped training after epoch 1")
    answers_other = lambda epoch, logs: 1                                  # noqa: E731
    with pytest.raises(ValueError, match="on_epoch_end returned 1"):
        net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=8, on_epoch_end=answers_other)


def test_an_exception_in_a_callback_keeps_the_history(rng):
    net, opt, X, y = _setup(rng)

    class Boom(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyError("planted")

    with pytest.raises(KeyError) as caught:
        net.fit(X, y, "softmax_ce", opt, epochs=5, batch_size=8, validation_data=(X, y), callbacks=[Boom()])
    history = caught.value.history
    assert history is net.history and len(history["val_loss"]) == 2
    assert history.stop_reason.startswith("KeyError raised during fit")


def test_history_has_its_keys_even_when_no_epoch_finishes(rng):
    net, opt, X, y = _setup(rng, loss="bce")
    history = net.fit(X, y, "bce", opt, epochs=3, initial_epoch=3, validation_data=(X, y))
    assert dict(history) == {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    assert history.stop_reason is None and history.epoch == []
    net = make_net([4, 6, 1], hidden="identity", loss="bce", dtype="float32")
    opt = gpubp.SGD(net, lr=0.1)
    net.set_params([{"W": np.ones((6, 4)), "b": np.zeros(6)}, net.get_params()[1]])
    X_bad = np.abs(X)
    X_bad[:8] = 3e38                     # Z = 4 · 3e38 overflows float32 in the first batch: fit stops there
    with pytest.warns(RuntimeWarning, match="fit stopped: epoch 1, batch 1 of 5"):
        history = net.fit(X_bad, y, "bce", opt, epochs=2, batch_size=8, shuffle=False, validation_data=(X, y))
    assert dict(history) == {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    assert isinstance(history.fault, FloatingPointError) and history.stop_reason.startswith("epoch 1, batch 1 of 5")


def test_initial_epoch_numbers_the_epochs(rng):
    net, opt, X, y = _setup(rng)
    seen = []
    history = net.fit(X, y, "softmax_ce", opt, epochs=4, initial_epoch=2, batch_size=8,
                      on_epoch_end=lambda epoch, logs: seen.append(epoch))
    assert seen == [2, 3] == history.epoch and len(history["loss"]) == 2


def test_verbose_shows_progress_without_a_read_per_step(rng, capsys):
    net, opt, X, y = _setup(rng, n=80)
    before = dict(net.backend.counters)
    net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=2, verbose=1)        # 40 batches an epoch
    reads = net.backend.counters["d2h"] - before["d2h"]
    assert reads <= 2 * 20 + 1                      # every second batch at most (+1: fit's first read)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err and "loss" in err
    net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=8, verbose=2, validation_data=(X, y))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and "val_accuracy" in lines[1] and "samples/s" in lines[1]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(callbacks=[object()]), TypeError, r"callbacks\[0\]: expected a gpubp.callbacks.Callback"),
    (dict(callbacks="EarlyStopping"), TypeError, "callbacks: expected a list"),
    (dict(callbacks=[EarlyStopping()]), ValueError, "not 'val_loss'; pass validation_data"),
    (dict(callbacks=[ModelCheckpoint("m-{epok}.npz")]), ValueError, "format fields"),
    (dict(verbose=3), ValueError, "verbose: expected 0"),
    (dict(initial_epoch=5), ValueError, "initial_epoch: expected an integer from 0 to epochs"),
])
def test_bad_callback_arguments_leave_the_model_untouched(rng, kwargs, error, match):
    net, opt, X, y = _setup(rng)
    before = snapshot(net)
    with pytest.raises(error, match=match):
        net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=8, **kwargs)
    assert_unchanged(before, net)


@pytest.mark.parametrize("make, match", [
    (lambda: EarlyStopping(patience=-1), "patience"),
    (lambda: EarlyStopping(min_delta=float("nan")), "min_delta"),
    (lambda: EarlyStopping(mode="up"), "mode"),
    (lambda: ModelCheckpoint("/no/such/folder/m.npz"), "does not exist"),
])
def test_bad_callback_settings_are_refused(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
