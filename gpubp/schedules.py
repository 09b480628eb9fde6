"""Learning-rate schedules: `gpubp.Adam(net, lr=gpubp.schedules.Cosine(1e-3, total=50, warmup=5))`.

Each schedule is a pure function of the position t (0-based: the epoch, or the train step with per="step") that
gives the learning rate, with the values of the matching torch.optim.lr_scheduler after t calls of its step():

    StepDecay(lr, step_size, gamma=0.1)      lr · gamma^⌊t / step_size⌋                              torch: StepLR
    Exponential(lr, gamma)                   lr · gamma^t                                             ExponentialLR
    Cosine(lr, total, warmup=0, min_lr=0)    t < warmup:  lr · (t + 1) / warmup                       LinearLR, then
                                             t ≤ total:   min_lr + (lr − min_lr) · (1 + cos(π s)) / 2 CosineAnnealingLR
                                                          with s = (t − warmup) / (total − warmup)
                                             t > total:   min_lr (torch's cosine would rise again)
    ReduceOnPlateau(lr, monitor="val_loss", factor=0.1, patience=10, ...)               ReduceLROnPlateau
                                             a function of the monitored values seen so far, one per epoch

How they are applied: fit sets the optimizer's lr from its schedule before each epoch (per="epoch", the default)
or before each step (per="step"; train_step does too, at the model's step count). The learning rate lives in
device memory (the optimizer's `hyper` array), so a new value is one small host-to-device copy that waits for
nothing and needs no CUDA-graph recapture; a per-epoch schedule writes at most once an epoch, a per-step one
once a step, and only when the value changes. Outside fit, set `opt.lr = schedule(epoch)` yourself.
A schedule is saved with the optimizer in a checkpoint (as JSON: its type and settings, and for ReduceOnPlateau
the values it has seen), so a resumed run continues the same curve.
"""
import inspect
import math
import numbers


def _positive(value, what, low=0.0, low_open=True, high=None, high_open=False, integer=False):
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
                or (low_open and value == low):
            raise ValueError(f"{what}: expected an integer {'>' if low_open else '>='} {low:g}, got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low):
        raise ValueError(f"{what}: expected a value {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{what}: expected a value {'<' if high_open else '<='} {high:g}, got {value!r}")
    return value


class Schedule:
    """The base: lr(t) for t = 0, 1, 2, ... Subclasses set `lr` (the starting rate) and implement __call__."""

    per = "epoch"

    def _init_per(self, per):
        if per not in ("epoch", "step"):
            raise ValueError(f"{type(self).__name__} per: expected 'epoch' or 'step', got {per!r}")
        self.per = per

    def __call__(self, t):
        raise NotImplementedError

    def _check_t(self, t):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"{type(self).__name__}: expected a position t >= 0 (an integer), got {t!r}")
        return int(t)

    def lr_at(self, t):
        """The rate for position t, as fit asks for it (ReduceOnPlateau answers from the values it has seen)."""
        return self(t)

    def check_metrics(self, metrics):
        """Called by fit, before it touches anything, with the names of its logs."""

    def observe(self, logs):
        """Called by fit after each epoch with its logs."""

    def settings(self):
        """The constructor's arguments, JSON-able (what a checkpoint keeps)."""
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {name: getattr(self, name) for name in names}

    def to_dict(self):
        return {"type": type(self).__name__, "settings": self.settings()}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


class StepDecay(Schedule):
    """lr · gamma^⌊t / step_size⌋: torch's StepLR."""

    def __init__(self, lr, step_size, gamma=0.1, per="epoch"):
        self.lr = _positive(lr, "StepDecay lr")
        self.step_size = _positive(step_size, "StepDecay step_size", integer=True)
        self.gamma = _positive(gamma, "StepDecay gamma")
        self._init_per(per)

    def __call__(self, t):
        return self.lr * self.gamma ** (self._check_t(t) // self.step_size)


class Exponential(Schedule):
    """lr · gamma^t: torch's ExponentialLR."""

    def __init__(self, lr, gamma, per="epoch"):
        self.lr = _positive(lr, "Exponential lr")
        self.gamma = _positive(gamma, "Exponential gamma")
        self._init_per(per)

    def __call__(self, t):
        return self.lr * self.gamma ** self._check_t(t)


class Cosine(Schedule):
    """A linear warm-up over `warmup` positions (lr · (t + 1) / warmup, reaching lr at t = warmup − 1), then a
    half cosine from lr down to min_lr at t = total, and min_lr after that. torch: LinearLR(start_factor=1/warmup,
    total_iters=warmup − 1) then CosineAnnealingLR(T_max=total − warmup, eta_min=min_lr), joined by
    SequentialLR(milestones=[warmup]); without warm-up, CosineAnnealingLR(T_max=total) alone."""

    def __init__(self, lr, total, warmup=0, min_lr=0.0, per="epoch"):
        self.lr = _positive(lr, "Cosine lr")
        self.total = _positive(total, "Cosine total", integer=True)
        self.warmup = _positive(warmup, "Cosine warmup", low_open=False, integer=True)
        if self.warmup >= self.total:
            raise ValueError(f"Cosine warmup: expected fewer positions than total ({total}), got {warmup!r}")
        self.min_lr = _positive(min_lr, "Cosine min_lr", low_open=False, high=self.lr)
        self._init_per(per)

    def __call__(self, t):
        t = self._check_t(t)
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        if t >= self.total:
            return self.min_lr
        progress = (t - self.warmup) / (self.total - self.warmup)
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


class ReduceOnPlateau(Schedule):
    """lr, multiplied by `factor` whenever `monitor` has not improved for more than `patience` epochs (torch's
    ReduceLROnPlateau, rule for rule: threshold in "rel" or "abs" mode, cooldown epochs after a cut, never below
    min_lr, a cut smaller than 1e-8 skipped). A pure function of the monitored values, one per epoch:
    schedule([0.9, 0.7, 0.7, ...]) is the rate for the epoch after them. In fit it answers from the values it has
    been shown (`observed`, kept in checkpoints)."""

    def __init__(self, lr, monitor="val_loss", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                 cooldown=0, min_lr=0.0, mode="min"):
        self.lr = _positive(lr, "ReduceOnPlateau lr")
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"ReduceOnPlateau monitor: expected a metric name such as 'val_loss', got {monitor!r}")
        self.monitor = monitor
        self.factor = _positive(factor, "ReduceOnPlateau factor", high=1.0, high_open=True)
        self.patience = _positive(patience, "ReduceOnPlateau patience", low_open=False, integer=True)
        self.threshold = _positive(threshold, "ReduceOnPlateau threshold", low_open=False)
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceOnPlateau threshold_mode: expected 'rel' or 'abs', got {threshold_mode!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"ReduceOnPlateau mode: expected 'min' or 'max', got {mode!r}")
        self.threshold_mode, self.mode = threshold_mode, mode
        self.cooldown = _positive(cooldown, "ReduceOnPlateau cooldown", low_open=False, integer=True)
        self.min_lr = _positive(min_lr, "ReduceOnPlateau min_lr", low_open=False, high=self.lr)
        self.observed = []

    def _better(self, value, best):
        if self.mode == "min":
            bound = best * (1 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold
            return value < bound
        bound = best * (1 + self.threshold) if self.threshold_mode == "rel" else best + self.threshold
        return value > bound

    def __call__(self, values):
        lr, bad, cooldown_left = self.lr, 0, 0
        best = math.inf if self.mode == "min" else -math.inf
        for value in values:
            value = float(value)
            if self._better(value, best):
                best, bad = value, 0
            else:
                bad += 1
            if cooldown_left > 0:
                cooldown_left -= 1
                bad = 0
            if bad > self.patience:
                cut = max(lr * self.factor, self.min_lr)
                if lr - cut > 1e-8:
                    lr = cut
                cooldown_left, bad = self.cooldown, 0
        return lr

    def lr_at(self, t):
        return self(self.observed)

    def check_metrics(self, metrics):
        if self.monitor not in metrics:
            hint = "; pass validation_data to fit" if self.monitor.startswith("val_") else ""
            raise ValueError(f"ReduceOnPlateau monitor: fit's logs will hold {', '.join(metrics)}, not "
                             f"{self.monitor!r}{hint}")

    def observe(self, logs):
        self.observed.append(float(logs[self.monitor]))

    def to_dict(self):
        return dict(super().to_dict(), observed=list(self.observed))


SCHEDULES = {cls.__name__: cls for cls in (StepDecay, Exponential, Cosine, ReduceOnPlateau)}


def from_dict(d):
    """The schedule a checkpoint describes ({"type", "settings", and "observed" for ReduceOnPlateau}), every
    field checked: ValueError for anything else (a checkpoint is never trusted)."""
    if not isinstance(d, dict) or not isinstance(d.get("type"), str) or d["type"] not in SCHEDULES \
            or not isinstance(d.get("settings"), dict):
        raise ValueError(f"schedule: expected {{'type': one of {sorted(SCHEDULES)}, 'settings': {{...}}}}, "
                         f"got {d!r:.100}")
    cls = SCHEDULES[d["type"]]
    allowed = list(inspect.signature(cls.__init__).parameters)[1:]
    unknown = [key for key in d["settings"] if key not in allowed]
    if unknown:
        raise ValueError(f"schedule {d['type']}: unknown settings {unknown!r:.100}")
    try:
        schedule = cls(**d["settings"])
    except TypeError as exc:
        raise ValueError(f"schedule {d['type']}: {exc}") from None
    if isinstance(schedule, ReduceOnPlateau):
        observed = d.get("observed", [])
        if not isinstance(observed, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in observed):
            raise ValueError(f"schedule ReduceOnPlateau: observed must be a list of numbers, got {observed!r:.100}")
        schedule.observed = [float(v) for v in observed]
    return schedule
