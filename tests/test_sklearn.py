"""gpubp.sklearn: MLPClassifier and MLPRegressor under scikit-learn's own estimator checks, in a Pipeline and
GridSearchCV, with labels of any type, pickled, and against a gpubp.Sequential trained by hand."""
import io
import pickle

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install gpubp[sklearn])")

from sklearn.utils.estimator_checks import parametrize_with_checks   # noqa: E402

from gpubp.sklearn import MLPClassifier, MLPRegressor   # noqa: E402

# Tiny networks and few epochs keep scikit-learn's ~50 checks per estimator inside the test budget; the numpy
# backend, so the instances are the same on every machine. Few epochs means sklearn's "not converged" warning,
# which is the point of the setting, not a fault.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

CHECKED = [MLPClassifier(hidden_layer_sizes=(16,), max_iter=100, learning_rate_init=0.01, random_state=0,
                         backend="numpy"),
           MLPRegressor(hidden_layer_sizes=(16,), max_iter=100, learning_rate_init=0.01, random_state=0,
                        backend="numpy")]

# Checks that cannot apply, each with its reason (none silenced in bulk).
EXPECTED_FAILED = {}


@parametrize_with_checks(CHECKED, expected_failed_checks=lambda est: EXPECTED_FAILED.get(type(est).__name__, {}))
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ---- beyond sklearn's checks ------------------------------------------------------------------------------------
import gpubp   # noqa: E402
from gpubp import sklearn as gsk   # noqa: E402


def _blobs(rng, n=60, n_features=4, classes=3):
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, n_features)) * 3
    return centres[labels] + rng.standard_normal((n, n_features)), labels


def test_classifier_trains_the_network_one_would_build_by_hand(rng):
    """The estimator's wiring: layers, output activation and loss, seed, SGD settings (alpha is weight decay),
    batch size and epochs give bit for bit the network trained directly through gpubp."""
    X, y = _blobs(rng)
    est = MLPClassifier(hidden_layer_sizes=(8, 5), activation="tanh", solver="sgd", alpha=0.01, momentum=0.8,
                        nesterovs_momentum=True, learning_rate_init=0.05, batch_size=16, max_iter=7,
                        n_iter_no_change=100, random_state=3, backend="numpy", dtype="float64").fit(X, y)
    net = gpubp.Sequential(gpubp.Dense(4, 8, "tanh"), gpubp.Dense(8, 5, "tanh"), gpubp.Dense(5, 3, "identity"),
                           backend="numpy", dtype="float64", seed=3)
    opt = gpubp.SGD(net, lr=0.05, momentum=0.8, weight_decay=0.01, nesterov=True)
    history = net.fit(X, y, loss="softmax_ce", optimizer=opt, epochs=7, batch_size=16)
    for mine, theirs in zip(est.net_.get_params(), net.get_params()):
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])
    assert est.loss_curve_ == history["loss"] and est.n_iter_ == 7
    logits = net.predict(X)
    np.testing.assert_allclose(est.predict_proba(X), gsk._softmax(logits), rtol=1e-12)
    np.testing.assert_array_equal(est.predict(X), np.argmax(logits, axis=1))


def test_regressor_adam_and_multioutput_match_the_hand_built_network(rng):
    X = rng.standard_normal((40, 3))
    Y = np.column_stack([X.sum(axis=1), X[:, 0] * X[:, 1]])
    est = MLPRegressor(hidden_layer_sizes=6, activation="logistic", alpha=0.001, learning_rate_init=0.01,
                       beta_1=0.8, beta_2=0.99, epsilon=1e-7, batch_size=8, max_iter=4, n_iter_no_change=100,
                       random_state=5, backend="numpy").fit(X, Y)
    net = gpubp.Sequential(gpubp.Dense(3, 6, "sigmoid"), gpubp.Dense(6, 2, "identity"), backend="numpy", seed=5)
    opt = gpubp.Adam(net, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.001)
    net.fit(X, Y, loss="mse", optimizer=opt, epochs=4, batch_size=8)
    np.testing.assert_array_equal(est.predict(X), net.predict(X))
    assert est.predict(X).shape == (40, 2)
    assert MLPRegressor(max_iter=2, backend="numpy").fit(X, Y[:, 0]).predict(X).shape == (40,)


@pytest.mark.parametrize("labels", [["cat", "dog"], [1, 2], [-1, 1], ["a", "b", "c"], [10.0, 30.0, -20.0]],
                         ids=["strings", "one-two", "minus-one-one", "three-strings", "floats"])
def test_labels_of_any_type_are_encoded_inside(rng, labels):
    X, codes = _blobs(rng, classes=len(labels))
    y = np.array(labels, dtype=object if isinstance(labels[0], str) else None)[codes]
    est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, learning_rate_init=0.05, random_state=0,
                        backend="numpy").fit(X, y)
    reference = MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, learning_rate_init=0.05, random_state=0,
                              backend="numpy").fit(X, codes)
    order = np.argsort(labels)                 # classes_ is sorted; the codes follow the sorted order
    expected = np.array(labels)[order]
    assert list(est.classes_) == list(expected)
    rank = np.empty(len(labels), int)
    rank[order] = np.arange(len(labels))
    y_ranked = rank[codes]                      # the same problem with labels 0..k-1 in sorted order
    reference.fit(X, y_ranked)
    np.testing.assert_array_equal(est.predict_proba(X), reference.predict_proba(X))
    np.testing.assert_array_equal(est.predict(X), expected[reference.predict(X)])
    assert est.score(X, y) > 0.9


def test_continuous_targets_are_refused_by_the_classifier(rng):
    X, _ = _blobs(rng)
    with pytest.raises(ValueError, match="Unknown label type"):
        MLPClassifier(backend="numpy").fit(X, rng.standard_normal(len(X)))


def test_pipeline_and_grid_search(rng):
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, y = _blobs(rng, n=90)
    X = X * 100 + 50       # the scaler's job
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0,
                                                         learning_rate_init=0.05, backend="numpy"))
    search = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(4,), (8,)],
                                 "mlpclassifier__solver": ["sgd", "adam"]}, cv=3).fit(X, y)
    assert search.best_score_ > 0.8
    assert search.predict(X).shape == (90,)
    assert search.best_estimator_[-1].n_features_in_ == 4


def test_pickle_holds_numpy_and_resumes_exactly(rng):
    X, y = _blobs(rng)
    est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, batch_size=16, random_state=0, backend="numpy").fit(X, y)
    state = est.__getstate__()
    assert "net_" not in state and "net_" in vars(est)       # the estimator itself keeps its network
    # the network travels as gpubp's checkpoint: numpy arrays only, readable without unpickling anything
    with np.load(io.BytesIO(state["_net_checkpoint"]), allow_pickle=False) as archive:
        assert all(isinstance(archive[name], np.ndarray) for name in archive.files)
    copy = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(copy.predict_proba(X), est.predict_proba(X))
    # optimizer state and the shuffling generator travel too: one more epoch gives the same network
    est.partial_fit(X, y)
    copy.partial_fit(X, y)
    np.testing.assert_array_equal(copy.predict_proba(X), est.predict_proba(X))


def test_partial_fit_epochs_equal_fit_epochs(rng):
    X, y = _blobs(rng)
    y = np.array(["no", "yes"])[y % 2]
    settings = dict(hidden_layer_sizes=(6,), random_state=1, batch_size=16, backend="numpy")
    whole = MLPClassifier(max_iter=3, n_iter_no_change=100, **settings).fit(X, y)
    parts = MLPClassifier(**settings)
    for _ in range(3):
        parts.partial_fit(X, y, classes=["no", "yes"])
    np.testing.assert_array_equal(parts.predict_proba(X), whole.predict_proba(X))
    assert parts.n_iter_ == 3 and len(parts.loss_curve_) == 3


def test_stopping_rules(rng):
    X, y = _blobs(rng)
    # no improvement by tol: one improving epoch, then n_iter_no_change stale ones
    est = MLPClassifier(hidden_layer_sizes=(4,), tol=1e9, n_iter_no_change=3, max_iter=50, random_state=0,
                        backend="numpy").fit(X, y)
    assert est.n_iter_ == 4
    # early stopping keeps the parameters of the best validation epoch: training only up to that epoch gives them
    settings = dict(hidden_layer_sizes=(4,), early_stopping=True, validation_fraction=0.3, learning_rate_init=0.02,
                    random_state=0, backend="numpy")
    est = MLPClassifier(n_iter_no_change=4, max_iter=60, **settings).fit(X, y)
    best = int(np.argmax(est.validation_scores_))
    assert est.best_validation_score_ == est.validation_scores_[best] and est.n_iter_ < 60
    shorter = MLPClassifier(n_iter_no_change=1000, max_iter=best + 1, **settings).fit(X, y)
    np.testing.assert_array_equal(est.predict_proba(X), shorter.predict_proba(X))


@pytest.mark.parametrize("setting, value", [("hidden_layer_sizes", (4, 0)), ("activation", "softplus"),
                                            ("solver", "lbfgs"), ("alpha", -1.0), ("batch_size", 0),
                                            ("learning_rate_init", 0.0), ("max_iter", 0), ("dtype", "float16"),
                                            ("backend", "tpu"), ("validation_fraction", 1.0)])
def test_bad_settings_name_themselves_and_leave_a_fitted_estimator_as_it_was(rng, setting, value):
    X, y = _blobs(rng)
    est = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0, backend="numpy").fit(X, y)
    net, before = est.net_, est.predict_proba(X)
    est.set_params(**{setting: value})
    with pytest.raises(ValueError, match=setting):
        est.fit(X, y)
    assert est.net_ is net and est.n_features_in_ == 4
    np.testing.assert_array_equal(est.predict_proba(X), before)


def test_bad_data_leaves_a_fitted_estimator_as_it_was(rng):
    X, y = _blobs(rng)
    est = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0, backend="numpy").fit(X, y)
    net, before, attributes = est.net_, est.predict_proba(X), dict(vars(est))
    bad_X = X.copy()
    bad_X[3, 1] = np.nan
    for call in (lambda: est.fit(bad_X, y), lambda: est.fit(X, np.zeros(len(X))),
                 lambda: est.partial_fit(X, np.full(len(X), 7)), lambda: est.partial_fit(X[:, :2], y)):
        with pytest.raises(ValueError):
            call()
        assert vars(est).keys() == attributes.keys() and est.net_ is net
        np.testing.assert_array_equal(est.predict_proba(X), before)


def test_partial_fit_needs_classes_first():
    with pytest.raises(ValueError, match="classes"):
        MLPClassifier(backend="numpy").partial_fit(np.zeros((4, 2)), [0, 1, 0, 1])


def test_precision_is_passed_on_and_pickled(rng):
    X, y = _blobs(rng)
    est = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, backend="numpy", precision="bf16").fit(X, y)
    assert est.net_.precision == "bf16" and pickle.loads(pickle.dumps(est)).net_.precision == "bf16"
    default = gpubp.Sequential(gpubp.Dense(4, 3), backend="numpy").precision
    assert MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, backend="numpy").fit(X, y).net_.precision == default
    with pytest.raises(ValueError, match="precision"):
        MLPClassifier(backend="numpy", precision="fp8").fit(X, y)


def test_feature_names_are_kept():
    pd = pytest.importorskip("pandas", reason="pandas is not installed (feature_names_in_ needs a DataFrame)")
    X = pd.DataFrame({"height": [1.0, 2.0, 3.0, 4.0], "width": [0.0, 1.0, 0.0, 1.0]})
    est = MLPRegressor(hidden_layer_sizes=(3,), max_iter=2, backend="numpy").fit(X, [1.0, 2.0, 3.0, 4.0])
    assert list(est.feature_names_in_) == ["height", "width"]


def test_fused_is_passed_on(rng):
    """fused= reaches the network: a qualifying bf16 model takes the fused path unless told not to."""
    X, y = rng.standard_normal((40, 4)), rng.integers(0, 3, 40)
    kw = dict(hidden_layer_sizes=(16,), max_iter=1, backend="numpy", precision="bf16")
    assert MLPClassifier(**kw).fit(X, y).net_.fused
    assert not MLPClassifier(**kw, fused=False).fit(X, y).net_.fused
    with pytest.raises(ValueError, match="fused"):
        MLPClassifier(**kw, fused="sometimes").fit(X, y)
