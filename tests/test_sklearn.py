"""gpubp.sklearn: MLPClassifier and MLPRegressor under scikit-learn's own estimator checks, in a Pipeline and
GridSearchCV, with labels of any type, pickled, and against a gpubp.Sequential trained by hand."""
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
