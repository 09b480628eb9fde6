"""Class labels: fit takes any labels (strings, {1, 2}, {-1, 1}, ...), encodes them once into what the loss trains
on, and keeps them in the model (`net.classes`, saved in its checkpoint) so that predict_classes answers with them.

    softmax_ce  labels (N,) -> indices into net.classes (N,); classes: the sorted distinct labels, one per output
    bce         labels (N,) or (N, 1) of two distinct values -> 1.0 for classes[1], 0.0 for classes[0] (N, 1)

Labels that already are what the loss trains on need no classes and get none (net.classes stays None): integer
indices 0 … out − 1 for softmax_ce, targets in [0, 1] for bce (probabilities too). Once a model has classes,
every y given to it (fit, evaluate, validation data) is read as labels of those classes.
Classes are strings or numbers (they are saved as JSON, never pickled), all of one kind.
"""
import math
import numbers

import numpy as np

from . import losses


def _as_host(y):
    """y as a numpy array when it is host data (a list, a numpy array), else None (a device array: not read)."""
    if isinstance(y, np.ndarray):
        return y
    if isinstance(y, (list, tuple)):
        try:
            return np.asarray(y)
        except Exception:
            return None
    return None


def _plain(value):
    """A numpy scalar as the plain Python value JSON keeps (str, int, float, bool)."""
    return value.item() if hasattr(value, "item") else value


def check_classes(classes, n_out):
    """`classes` as a numpy array after checking them: distinct strings or distinct finite numbers, two of them for
    a single output (bce) or one per output (softmax_ce). ValueError / TypeError naming what is wrong."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple, np.ndarray)):
        raise TypeError(f"classes: expected a list of labels, got {type(classes).__name__}")
    values = [_plain(c) for c in (classes.tolist() if isinstance(classes, np.ndarray) else classes)]
    expected = 2 if n_out == 1 else n_out
    if len(values) != expected:
        why = "two, for one sigmoid output" if n_out == 1 else "one per output"
        raise ValueError(f"classes: expected {expected} labels ({why}), got {len(values)}")
    strings = all(isinstance(v, str) for v in values)
    numbers_ = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not (strings or numbers_):
        raise TypeError(f"classes: expected strings or finite numbers, all of one kind, got {values!r:.120}")
    if len(set(values)) != len(values):
        raise ValueError(f"classes: expected distinct labels, got {values!r:.120}")
    return np.asarray(values)


def encode(y, loss_id, n_out, classes, fitting):
    """(y ready for the loss, classes). `classes`: the model's (None when it has none); with fitting=True (fit),
    labels that need classes make them. y that needs no encoding (one-hot, float targets, a device array, label
    indices) is returned as it is, for the usual checks (Sequential._check_y)."""
    if loss_id == losses.MSE:
        return y, classes
    host = _as_host(y)
    if host is None or host.ndim == 0 or host.size == 0:
        return y, classes
    labels = host.reshape(-1) if loss_id == losses.BCE and host.ndim == 2 and host.shape[1] == 1 else host
    if labels.ndim != 1:
        return y, classes
    if labels.dtype.kind not in "biufUSO":
        return y, classes
    if classes is not None:
        if loss_id == losses.BCE and n_out != 1:
            raise ValueError(f"y: the model's classes apply to one bce output; this model has {n_out}")
        return _indices(labels, classes, loss_id), classes
    if _needs_no_classes(labels, loss_id, n_out):
        return y, None
    if not fitting:
        return y, None            # _check_y says what is wrong with them
    distinct = _distinct(labels)
    expected = 2 if loss_id == losses.BCE else n_out
    if loss_id == losses.BCE and n_out != 1:
        return y, None
    if len(distinct) != expected:
        what = ("bce: two distinct labels, or targets in [0, 1]" if loss_id == losses.BCE else
                f"softmax_ce: {n_out} distinct labels (one per output), or indices 0 to {n_out - 1}")
        raise ValueError(f"y: expected {what}; got {len(distinct)} distinct values {_show(distinct)}")
    classes = check_classes(distinct, n_out if loss_id == losses.SOFTMAX_CE else 1)
    return _indices(labels, classes, loss_id), classes


def _needs_no_classes(labels, loss_id, n_out):
    if labels.dtype.kind not in "biuf":
        return False
    if loss_id == losses.SOFTMAX_CE:
        return labels.dtype.kind in "biu" and labels.min() >= 0 and labels.max() < n_out
    with np.errstate(invalid="ignore"):
        return bool(np.all((labels >= 0) & (labels <= 1)))


def _distinct(labels):
    if labels.dtype.kind == "O":
        values = [_plain(v) for v in labels]
        if not (all(isinstance(v, str) for v in values) or
                all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)):
            kinds = sorted({type(v).__name__ for v in values})
            raise TypeError(f"y: expected labels that are all strings or all numbers, got {', '.join(kinds)}")
        labels = np.asarray(values)
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ValueError("y: a label is NaN or inf")
    return np.unique(labels)


def _indices(labels, classes, loss_id):
    """Each label's position in classes (ValueError for a label that is not one), as the loss wants it."""
    if labels.dtype.kind == "O":
        labels = np.asarray([_plain(v) for v in labels])
    if (classes.dtype.kind in "US") != (labels.dtype.kind in "US"):
        raise ValueError(f"y: expected labels among the model's classes {_show(classes)}, got {_show(labels[:3])}")
    order = np.argsort(classes, kind="stable")
    sorted_classes = classes[order]
    position = np.clip(np.searchsorted(sorted_classes, labels), 0, len(classes) - 1)
    unknown = sorted_classes[position] != labels
    if unknown.any():
        raise ValueError(f"y: label {_plain(labels[unknown][0])!r} is not one of the model's classes {_show(classes)}")
    index = order[position]
    if loss_id == losses.BCE:
        return index.astype(np.float64).reshape(-1, 1)
    return index.astype(np.int64)


def _show(values, limit=10):
    values = [_plain(v) for v in values]
    return repr(values[:limit])[:-1] + (", ...]" if len(values) > limit else "]")
