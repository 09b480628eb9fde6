"""Learning-rate schedules (gpubp/schedules.py): the values by hand and against torch.optim.lr_scheduler over 100
steps, fit following a schedule per epoch and per step (bit for bit what a hand-written loop of train_step gives,
with no extra wait for the device), the schedule kept in a checkpoint, and bad settings refused."""
import math

import numpy as np
import pytest

import gpubp
from gpubp.schedules import Cosine, Exponential, ReduceOnPlateau, StepDecay
from helpers import assert_unchanged, make_data, make_net, snapshot


# ---- values ---------------------------------------------------------------------------------------------------
def test_values_by_hand():
    assert [StepDecay(0.1, step_size=3, gamma=0.5)(t) for t in range(8)] == \
        pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025], rel=1e-15)
    assert Exponential(1.0, gamma=0.5)(3) == 0.125
    cosine = Cosine(1.0, total=10, warmup=2)
    assert [cosine(t) for t in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0], abs=1e-15)
    assert Cosine(1.0, total=10, warmup=2, min_lr=0.1)(6) == pytest.approx(0.55, rel=1e-15)
    assert Cosine(2.0, total=4)(1) == pytest.approx(1 + math.cos(math.pi / 4), rel=1e-15)
    plateau = ReduceOnPlateau(1.0, factor=0.5, patience=1)
    values = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    assert [plateau(values[:k]) for k in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    cooled = ReduceOnPlateau(1.0, factor=0.5, patience=0, cooldown=2, mode="max", threshold_mode="abs", threshold=0.1)
    # no improvement ever after the first: a cut, two epochs of cooldown, a cut, ...
    assert [cooled([3.0] * k) for k in range(1, 8)] == [1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def _torch_lrs(make_scheduler, steps=100, metrics=None):
    torch = pytest.importorskip("torch", reason="torch is not installed: the comparison with "
                                                "torch.optim.lr_scheduler needs it (pip install torch)")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(torch.optim.lr_scheduler, opt)
    lrs = []
    for t in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step(metrics[t]) if metrics is not None else scheduler.step()
    return lrs


def test_the_same_values_as_torch_over_100_steps(rng):
    cases = [
        (StepDecay(0.1, 7, gamma=0.5), lambda s, o: s.StepLR(o, step_size=7, gamma=0.5)),
        (Exponential(0.1, 0.97), lambda s, o: s.ExponentialLR(o, gamma=0.97)),
        (Cosine(0.1, total=100, min_lr=0.001), lambda s, o: s.CosineAnnealingLR(o, T_max=100, eta_min=0.001)),
        (Cosine(0.1, total=100, warmup=10, min_lr=0.001), lambda s, o: s.SequentialLR(o, [
            s.LinearLR(o, start_factor=1 / 10, total_iters=9), s.CosineAnnealingLR(o, T_max=90, eta_min=0.001)],
            milestones=[10])),
    ]
    for ours, theirs in cases:
        assert [ours(t) for t in range(100)] == pytest.approx(_torch_lrs(theirs), rel=1e-9, abs=1e-15), ours
    # a noisy, flattening curve: several cuts, with cooldown and a floor
    metrics = list(1 / (1 + np.arange(100) / 10) + 0.05 * rng.random(100))
    for mode, threshold_mode in (("min", "rel"), ("max", "abs")):
        ours = ReduceOnPlateau(0.1, factor=0.5, patience=3, cooldown=2, min_lr=0.002, mode=mode,
                               threshold_mode=threshold_mode, threshold=0.01)
        theirs = _torch_lrs(lambda s, o: s.ReduceLROnPlateau(o, mode=mode, factor=0.5, patience=3, cooldown=2,
                                                             min_lr=0.002, threshold_mode=threshold_mode,
                                                             threshold=0.01), metrics=metrics)
        assert [ours(metrics[:t]) for t in range(100)] == pytest.approx(theirs, rel=1e-12)
        assert len(set(theirs)) > 2                    # the case does cut, more than once


# ---- in fit -----------------------------------------------------------------------------------------------------
def _setup(rng, lr):
    X, y = make_data(rng, 24, 4, 3, "softmax_ce")
    net = make_net([4, 5, 3], hidden="tanh", loss="softmax_ce", dtype="float32")
    return net, gpubp.SGD(net, lr=lr, momentum=0.9), X, y


class LrRecorder(gpubp.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.lrs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.lrs.append(self.model.optimizer.lr)


@pytest.mark.parametrize("schedule", [StepDecay(0.2, 2, gamma=0.5), Cosine(0.2, total=5, warmup=2),
                                      Exponential(0.2, 0.5, per="step")])
def test_fit_follows_the_schedule_as_a_loop_of_train_steps_would(rng, schedule):
    net, opt, X, y = _setup(rng, schedule)
    twin, twin_opt, _, _ = _setup(rng, 0.123)
    recorder = LrRecorder()
    net.fit(X, y, "softmax_ce", opt, epochs=5, batch_size=8, shuffle=False, callbacks=[recorder])
    for epoch in range(5):
        for b in range(3):
            twin_opt.lr = schedule(epoch if schedule.per == "epoch" else 3 * epoch + b)
            twin.train_step(X[8 * b:8 * b + 8], y[8 * b:8 * b + 8], "softmax_ce", twin_opt)
    assert net.backend.to_numpy(net.params).tobytes() == twin.backend.to_numpy(twin.params).tobytes()
    if schedule.per == "epoch":
        assert recorder.lrs == [schedule(e) for e in range(5)]


def test_a_per_step_schedule_adds_no_wait_for_the_device(rng):
    reads = {}
    for n in (24, 48):
        X, y = make_data(rng, n, 4, 3, "softmax_ce")
        net = make_net([4, 5, 3], hidden="tanh", loss="softmax_ce", dtype="float32")
        opt = gpubp.SGD(net, lr=Cosine(0.1, total=20, warmup=3, per="step"))
        before = dict(net.backend.counters)
        net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=4)
        reads[n] = net.backend.counters["sync"] - before["sync"]
    assert reads[24] == reads[48]


def test_reduce_on_plateau_in_fit_cuts_on_the_monitored_metric(rng):
    net, opt, X, y = _setup(rng, ReduceOnPlateau(0.1, monitor="loss", factor=0.5, patience=0, threshold=1e3,
                                                 threshold_mode="abs"))
    recorder = LrRecorder()          # better by 1000: no epoch counts as better than the first
    history = net.fit(X, y, "softmax_ce", opt, epochs=4, batch_size=8, callbacks=[recorder])
    assert recorder.lrs == [0.1, 0.1, 0.05, 0.025] and opt.schedule.observed == history["loss"]


def test_a_schedule_is_kept_in_the_checkpoint(rng, tmp_path):
    net, opt, X, y = _setup(rng, ReduceOnPlateau(0.1, monitor="loss", patience=0, threshold=1e3,
                                                 threshold_mode="abs"))
    net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=8)
    net.save(tmp_path / "m.npz")
    loaded = gpubp.load(tmp_path / "m.npz", backend="numpy").optimizer
    assert repr(loaded) == repr(opt) and loaded.schedule.observed == opt.schedule.observed and loaded.lr == opt.lr
    net, opt, X, y = _setup(rng, Cosine(0.1, total=4, per="step"))
    net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=8)     # 6 steps: the cosine is at its floor, 0
    net.save(tmp_path / "m.npz")
    assert opt.lr == 0.0 and gpubp.load(tmp_path / "m.npz", backend="numpy").optimizer.lr == 0.0
    opt.lr = 0.05                                    # a number replaces the schedule
    assert opt.schedule is None and opt.lr == 0.05


@pytest.mark.parametrize("make, match", [
    (lambda: StepDecay(0.1, step_size=0), "step_size"),
    (lambda: Exponential(0.1, gamma=float("inf")), "gamma"),
    (lambda: Cosine(0.1, total=10, warmup=10), "warmup"),
    (lambda: Cosine(0.1, total=10, min_lr=0.2), "min_lr"),
    (lambda: Cosine(0.1, total=10, per="batch"), "per"),
    (lambda: ReduceOnPlateau(0.1, factor=1.0), "factor"),
    (lambda: ReduceOnPlateau(0.1, threshold_mode="pct"), "threshold_mode"),
    (lambda: Cosine(0.1, total=10)(-1), "position"),
])
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_plateau_on_a_missing_metric_is_refused_before_fit_touches_anything(rng):
    net, opt, X, y = _setup(rng, ReduceOnPlateau(0.1))            # monitors val_loss; no validation data
    before = snapshot(net)
    with pytest.raises(ValueError, match="ReduceOnPlateau monitor: .* not 'val_loss'; pass validation_data"):
        net.fit(X, y, "softmax_ce", opt, epochs=2, batch_size=8)
    assert_unchanged(before, net)
