"""scikit-learn estimators over gpubp.Sequential: MLPClassifier and MLPRegressor.

    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from gpubp.sklearn import MLPClassifier
    clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=50)).fit(X, y)

The constructor arguments follow sklearn.neural_network's MLP names where they mean the same thing, plus
gpubp's own `backend`, `dtype`, `precision` and `fused`; they are stored as given and checked in fit (scikit-learn's
convention). The network a fit makes:
    hidden layers   Dense(…, activation) for each entry of hidden_layer_sizes
    classifier      two classes: one sigmoid output trained with bce; more: identity outputs trained with
                    softmax_ce (the softmax is part of the loss, and predict_proba applies it)
    regressor       identity outputs trained with mse
Class labels of any type (strings, {1, 2}, {-1, 1}) are encoded here: the network sees 0 … k-1.

Differences from sklearn's MLP, by design: `alpha` is the optimizer's weight decay (torch's rule, which also
decays the biases), not a penalty added to the reported loss; `loss_curve_` is gpubp's mean training loss per
epoch. Training stops after `max_iter` epochs, or earlier when the training loss (or, with early_stopping, the
validation score) has not improved by `tol` for `n_iter_no_change` epochs, as sklearn's MLP does.

A fitted estimator keeps its network as `net_` (a gpubp.Sequential: export it with gpubp.export). Pickling
stores the network as gpubp's checkpoint (numpy arrays and JSON: parameters, optimizer state, generator,
precision), never device arrays; unpickling rebuilds it on the estimator's `backend`.

scikit-learn is an optional dependency (pip install gpubp[sklearn]); this module needs it at import.
"""
import numbers
import os
import tempfile
import warnings

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:   # missing, or older than 1.6 (no validate_data)
    raise ImportError(f"gpubp.sklearn needs scikit-learn >= 1.6 ({exc}): pip install gpubp[sklearn]") from exc

from .activations import NAMES as ACTIVATIONS
from .layers import Dense
from .network import Sequential
from .optim import SGD, Adam
from .serialize import load

# sklearn's activation names beside gpubp's own: "logistic" is sklearn's name for the sigmoid.
_ACTIVATION_ALIASES = {"logistic": "sigmoid"}
_SOLVERS = ("sgd", "adam")


class _StopTraining(Exception):
    """Raised from fit's epoch callback to end training early; the model is consistent at that point (the
    epoch's steps are all read back)."""


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _check_number(value, name, low, low_open=False, high=None, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and (value > high or (high_open and value == high))):
        bounds = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and {'<' if high_open else '<='} {high}")
        raise ValueError(f"{name}: expected a value {bounds}, got {value!r}")
    return float(value)


def _softmax(Z):
    """Row-wise softmax in float64, stable for any finite Z."""
    Z = np.asarray(Z, np.float64)
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: argument checks, building the network and its optimizer,
    the epoch loop with its stopping rules, partial_fit, pickling."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate_init=0.001, max_iter=200, shuffle=True, random_state=None,
                 tol=1e-4, momentum=0.9, nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, backend="auto", dtype="float32",
                 precision=None, fused="auto"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.backend = backend
        self.dtype = dtype
        self.precision = precision
        self.fused = fused

    # ---- subclasses say what the output layer and loss are -------------------------------------------------
    _numeric_targets = True   # regression: float targets, one or more columns; classification: labels (N,)

    def _encode_targets(self, y, first_call, classes=None):
        """(targets for the network, output width, output activation, loss name)."""
        raise NotImplementedError

    def _validation_score(self, X, y):
        raise NotImplementedError

    # ---- argument checks: all before anything is made or changed -------------------------------------------
    def _checked_settings(self):
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
            sizes = (sizes,)
        if not isinstance(sizes, (tuple, list, np.ndarray)):
            raise ValueError(f"hidden_layer_sizes: expected a tuple of positive integers, got {sizes!r}")
        sizes = [_check_positive_int(s, f"hidden_layer_sizes[{i}]") for i, s in enumerate(sizes)]
        if not isinstance(self.activation, str) or _ACTIVATION_ALIASES.get(self.activation, self.activation) not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(list(ACTIVATIONS) + list(_ACTIVATION_ALIASES))}, "
                             f"got {self.activation!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver: expected one of {list(_SOLVERS)}, got {self.solver!r}")
        _check_number(self.alpha, "alpha", 0.0)
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            _check_positive_int(self.batch_size, "batch_size (or 'auto')")
        _check_number(self.learning_rate_init, "learning_rate_init", 0.0, low_open=True)
        _check_positive_int(self.max_iter, "max_iter")
        _check_positive_int(self.n_iter_no_change, "n_iter_no_change")
        _check_number(self.tol, "tol", 0.0)
        _check_number(self.momentum, "momentum", 0.0, high=1.0)
        _check_number(self.validation_fraction, "validation_fraction", 0.0, low_open=True, high=1.0, high_open=True)
        _check_number(self.beta_1, "beta_1", 0.0, high=1.0, high_open=True)
        _check_number(self.beta_2, "beta_2", 0.0, high=1.0, high_open=True)
        _check_number(self.epsilon, "epsilon", 0.0, low_open=True)
        for name in ("shuffle", "nesterovs_momentum", "early_stopping"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.random_state is not None and not isinstance(self.random_state, (numbers.Integral, np.random.RandomState)):
            raise ValueError(f"random_state: expected None, an integer or a numpy RandomState, got {self.random_state!r}")
        return sizes

    # ---- the network ---------------------------------------------------------------------------------------
    def _seed(self):
        """Sequential's seed from random_state: an integer as given, else a draw from the generator."""
        rs = self.random_state
        if isinstance(rs, numbers.Integral) and not isinstance(rs, bool) and 0 <= rs < 2**63:
            return int(rs)
        return int(check_random_state(rs).randint(np.iinfo(np.int32).max))

    def _make_net(self, sizes, n_in, n_out, output_activation):
        hidden = _ACTIVATION_ALIASES.get(self.activation, self.activation)
        widths = [n_in] + sizes + [n_out]
        layers = [Dense(a, b, hidden if i < len(sizes) else output_activation)
                  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
        net = Sequential(*layers, backend=self.backend, dtype=self.dtype, seed=self._seed(), precision=self.precision,
                         fused=self.fused)
        if self.solver == "sgd":
            SGD(net, lr=self.learning_rate_init, momentum=self.momentum, weight_decay=self.alpha,
                nesterov=bool(self.nesterovs_momentum) and self.momentum > 0)
        else:
            Adam(net, lr=self.learning_rate_init, betas=(self.beta_1, self.beta_2), eps=self.epsilon,
                 weight_decay=self.alpha)
        return net

    def _batch_size(self, n_samples):
        return min(200, n_samples) if isinstance(self.batch_size, str) else min(int(self.batch_size), n_samples)

    # ---- fit -----------------------------------------------------------------------------------------------
    def _refit(self, X, y):
        """fit: forget what an earlier fit learnt, then train from scratch."""
        return self._keep_state_on_error(self._fit_fresh, X, y)

    def _fit_fresh(self, X, y):
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("__")]:
            delattr(self, name)
        return self._fit(X, y, incremental=False)

    def _keep_state_on_error(self, method, *args, **kwargs):
        """Run method; if it raises, the estimator's attributes are put back as they were, so bad input leaves a
        fitted estimator fitted as before (gpubp's networks check their input before touching anything)."""
        saved = dict(vars(self))
        try:
            return method(*args, **kwargs)
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise

    def _fit(self, X, y, incremental, classes=None):
        sizes = self._checked_settings()
        first_call = not (incremental and hasattr(self, "net_"))
        X, y = validate_data(self, X, y, reset=first_call, dtype=(np.float64, np.float32),
                             y_numeric=self._numeric_targets, multi_output=self._numeric_targets)
        targets, n_out, output_activation, loss = self._encode_targets(y, first_call, classes)
        if first_call:
            net = self._make_net(sizes, X.shape[1], n_out, output_activation)
        else:
            net = self.net_
        if incremental:
            history = net.fit(X, targets, loss=loss, epochs=1, batch_size=self._batch_size(X.shape[0]),
                              shuffle=bool(self.shuffle))
            self._check_stopped(history)
            self.net_, self.loss_ = net, history["loss"][-1]
            self.loss_curve_ = getattr(self, "loss_curve_", []) + history["loss"]
            self.n_iter_ = getattr(self, "n_iter_", 0) + 1
            return self
        self._train(net, X, y, targets, loss)
        return self

    def _train(self, net, X, y, targets, loss):
        """max_iter epochs, or fewer: the stopping rule is sklearn's (no improvement by tol for n_iter_no_change
        epochs, on the training loss, or on the validation score with early_stopping)."""
        X_val = y_val = None
        if self.early_stopping:
            stratify = y if isinstance(self, ClassifierMixin) else None
            rows = np.arange(X.shape[0])
            rows_train, rows_val = train_test_split(rows, test_size=self.validation_fraction,
                                                    random_state=self._seed(), stratify=stratify)
            X_val, y_val = X[rows_val], y[rows_val]
            X, targets = X[rows_train], targets[rows_train]
        curve, scores = [], []
        best = {"value": np.inf if X_val is None else -np.inf, "params": None, "stale": 0}

        def after_epoch(epoch, logs):
            curve.append(logs["loss"])
            if X_val is None:
                improved = logs["loss"] < best["value"] - self.tol
                if logs["loss"] < best["value"]:
                    best["value"] = logs["loss"]
            else:
                scores.append(self._validation_score(X_val, y_val))
                improved = scores[-1] > best["value"] + self.tol
                if scores[-1] > best["value"]:
                    best["value"], best["params"] = scores[-1], net.get_params()
            best["stale"] = 0 if improved else best["stale"] + 1
            if best["stale"] >= self.n_iter_no_change:
                raise _StopTraining

        self.net_ = net   # the validation score predicts through it
        converged = False
        try:
            history = net.fit(X, targets, loss=loss, epochs=int(self.max_iter), batch_size=self._batch_size(X.shape[0]),
                              shuffle=bool(self.shuffle), on_epoch_end=after_epoch)
            self._check_stopped(history)
        except _StopTraining:
            converged = True
        if best["params"] is not None:
            net.set_params(best["params"])
        self.loss_curve_ = curve
        self.loss_ = curve[-1]
        self.n_iter_ = len(curve)
        if X_val is not None:
            self.validation_scores_ = scores
            self.best_validation_score_ = best["value"]
        else:
            self.best_loss_ = best["value"]
        if not converged:
            warnings.warn(f"{type(self).__name__}: max_iter ({self.max_iter}) epochs reached and the optimization "
                          "has not converged yet", ConvergenceWarning)

    @staticmethod
    def _check_stopped(history):
        if history.stop_reason is not None:
            raise FloatingPointError(f"training stopped on a non-finite step ({history.stop_reason}); lower "
                                     "learning_rate_init")

    def _network_output(self, X):
        check_is_fitted(self, "net_")
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return self.net_.predict(X)

    # ---- pickling: numpy arrays only --------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(super().__getstate__())   # a copy: object.__getstate__ returns the instance's own dict
        net = state.pop("net_", None)
        if net is not None:
            state["_net_checkpoint"] = _network_to_bytes(net)
        return state

    def __setstate__(self, state):
        checkpoint = state.pop("_net_checkpoint", None)
        super().__setstate__(state)
        if checkpoint is not None:
            self.net_ = _network_from_bytes(checkpoint, self.backend)


def _network_to_bytes(net):
    """The network as gpubp's own checkpoint (an .npz of numpy arrays and JSON metadata: architecture, dtype,
    precision, parameters, optimizer state, generator), so a pickle holds no device array and carries whatever
    a checkpoint carries."""
    with tempfile.TemporaryDirectory(prefix="gpubp-pickle-") as folder:
        path = os.path.join(folder, "net.npz")
        net.save(path)
        with open(path, "rb") as f:
            return f.read()


def _network_from_bytes(data, backend):
    with tempfile.TemporaryDirectory(prefix="gpubp-pickle-") as folder:
        path = os.path.join(folder, "net.npz")
        with open(path, "wb") as f:
            f.write(data)
        return load(path, backend=backend)


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multilayer perceptron classifier trained by gpubp (see the module's docstring).

    Fitted attributes: classes_, n_features_in_, feature_names_in_ (when X has column names), net_,
    loss_curve_, loss_, n_iter_, best_loss_ (or validation_scores_ and best_validation_score_ with
    early_stopping)."""

    _numeric_targets = False

    def _encode_targets(self, y, first_call, classes=None):
        check_classification_targets(y)   # y is (n_samples,) here: validate_data made it so, or refused it
        if first_call:
            known = np.unique(y) if classes is None else np.unique(np.asarray(classes))
            if classes is not None and not np.all(np.isin(np.unique(y), known)):
                raise ValueError(f"y: labels {np.setdiff1d(np.unique(y), known)} are not in classes={known}")
            if len(known) < 2:
                raise ValueError(f"y: a classifier needs at least 2 classes to train, got 1 class: {known}")
        else:
            known = self.classes_
            unseen = np.setdiff1d(np.unique(y), known)
            if unseen.size:
                raise ValueError(f"y: labels {unseen} are not among the classes of the first partial_fit "
                                 f"{known}")
        encoded = np.searchsorted(known, y)
        self.classes_ = known
        if len(known) == 2:
            return encoded.astype(np.float64).reshape(-1, 1), 1, "sigmoid", "bce"
        return encoded.astype(np.int64), len(known), "identity", "softmax_ce"

    def fit(self, X, y):
        """Train a fresh network on (X, y); returns self."""
        return self._refit(X, y)

    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y). The first call makes the network and needs `classes`, every label the
        classifier will ever see (as sklearn's partial_fit convention asks)."""
        if not hasattr(self, "net_") and classes is None:
            raise ValueError("classes: the first call to partial_fit needs every class label, e.g. "
                             "partial_fit(X, y, classes=np.unique(y_all))")
        return self._keep_state_on_error(self._fit, X, y, incremental=True, classes=classes)

    def predict_proba(self, X):
        """(n_samples, n_classes) probabilities, columns in the order of classes_."""
        out = np.asarray(self._network_output(X), np.float64)
        if len(self.classes_) == 2:
            p = out[:, 0]
            return np.column_stack([1.0 - p, p])
        return _softmax(out)

    def predict_log_proba(self, X):
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        """The most probable class of each row, as a label of classes_."""
        out = self._network_output(X)
        index = (out[:, 0] > 0.5).astype(np.int64) if len(self.classes_) == 2 else np.argmax(out, axis=1)
        return self.classes_[index]

    def _validation_score(self, X, y):
        return float(np.mean(self.predict(X) == y))



class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multilayer perceptron regressor (identity outputs, mean squared error) trained by gpubp.

    y of shape (n_samples,) or (n_samples, n_outputs); predict returns the same shape. Fitted attributes as
    MLPClassifier's, without classes_."""

    def _encode_targets(self, y, first_call, classes=None):
        y = np.asarray(y, np.float64)
        if y.ndim not in (1, 2):
            raise ValueError(f"y: expected shape (n_samples,) or (n_samples, n_outputs), got {y.shape}")
        n_out = 1 if y.ndim == 1 else y.shape[1]
        if first_call:
            self.n_outputs_ = n_out
            self._y_was_1d = y.ndim == 1
        elif n_out != self.n_outputs_:
            raise ValueError(f"y: expected {self.n_outputs_} output columns as in the first partial_fit, got {n_out}")
        return y.reshape(-1, n_out), n_out, "identity", "mse"

    def fit(self, X, y):
        """Train a fresh network on (X, y); returns self."""
        return self._refit(X, y)

    def partial_fit(self, X, y):
        """One epoch over (X, y); the first call makes the network."""
        return self._keep_state_on_error(self._fit, X, y, incremental=True)

    def predict(self, X):
        out = np.asarray(self._network_output(X), np.float64)
        return out[:, 0] if self._y_was_1d else out

    def _validation_score(self, X, y):
        return float(self.score(X, y))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True     # y may have several columns
        return tags
