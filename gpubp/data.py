"""Data for the command line: bundled sets, CSV and NPZ files, the seeded held-out split, standardisation, and
the loss a target implies.

    load_dataset("digits" | "data.csv" | "data.npz", target=None, seed=0) -> Dataset(X (N, in) float64, y (N,) or
                                                                                    (N, out), feature_names, ...)
    infer_loss(y)               integer classes > 2 -> "softmax_ce"; two classes -> "bce"; floats -> "mse"
    Targets.fit(y, loss)        what the loss trains on (label indices, 0/1 column, standardised values) and back
    Standardizer.fit(X)         mean/std from the training rows only, kept in the checkpoint as JSON
    split_indices(y, fraction, seed, stratify)

Every failure is a ValueError or FileNotFoundError whose message names the file, column or value, so the command
line can print it as one line.
"""
import csv
import os

import numpy as np

MAX_INFERRED_CLASSES = 100   # above this, infer_loss asks rather than guesses
BUNDLED = ("breast_cancer", "digits", "iris", "wine", "regression", "spiral")
_SKLEARN_LOADERS = {"breast_cancer": "load_breast_cancer", "digits": "load_digits", "iris": "load_iris",
                    "wine": "load_wine"}


class Dataset:
    """X (N, in) float64; y (N,) integer labels or floats, (N, out) floats, or None (a file without targets)."""

    def __init__(self, X, y, feature_names, target_name, source):
        self.X, self.y = X, y
        self.feature_names = list(feature_names)
        self.target_name = target_name
        self.source = source

    def __repr__(self):
        return f"Dataset({self.source!r}, X {self.X.shape}, y {None if self.y is None else self.y.shape})"


# ---- sources -------------------------------------------------------------------------------------------------
def load_dataset(spec, target=None, seed=0, require_target=True):
    """A bundled set by name, or a .csv / .npz file by path."""
    spec = os.fspath(spec)
    if spec in BUNDLED:
        if target is not None:
            raise ValueError(f"--target: applies to .csv files, not to the bundled set {spec!r}")
        return bundled(spec, seed)
    lower = spec.lower()
    if lower.endswith(".csv"):
        return read_csv(spec, target, require_target)
    if lower.endswith(".npz"):
        if target is not None:
            raise ValueError(f"--target: applies to .csv files; {spec} holds its targets as the array 'y'")
        return read_npz(spec, require_target)
    raise ValueError(f"data: expected a bundled set ({', '.join(BUNDLED)}) or a .csv or .npz file, got {spec!r}")


def bundled(name, seed=0):
    if name == "regression":
        return _synthetic_regression(seed)
    if name == "spiral":
        return _spiral(seed)
    if name not in _SKLEARN_LOADERS:
        raise ValueError(f"data: unknown bundled set {name!r}; expected one of {', '.join(BUNDLED)}")
    try:
        from sklearn import datasets
    except ImportError:
        raise ValueError(f"the bundled set {name!r} comes from scikit-learn, which is not installed: "
                         "pip install 'gpubp[cli]'") from None
    # These loaders read files that ship inside scikit-learn: no download.
    bunch = getattr(datasets, _SKLEARN_LOADERS[name])()
    return Dataset(np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64),
                   [str(f) for f in bunch.feature_names], "target", name)


def _synthetic_regression(seed, n=1000, n_features=8):
    """A smooth nonlinear target of 8 features plus a little noise: y = sin(2 x0) + x1² / 2 + x2·x3 + 0.1 ε."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_features))
    y = np.sin(2 * X[:, 0]) + 0.5 * X[:, 1] ** 2 + X[:, 2] * X[:, 3] + 0.1 * rng.standard_normal(n)
    return Dataset(X, y, [f"x{i}" for i in range(n_features)], "y", "regression")


def _spiral(seed, n_per_class=300, n_classes=3):
    """Three interleaved 2-D spiral arms, one class each: not linearly separable, easy for a small MLP."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for k in range(n_classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        theta = r * 4.0 + k * 2 * np.pi / n_classes + 0.15 * rng.standard_normal(n_per_class)
        X.append(np.column_stack([r * np.sin(theta), r * np.cos(theta)]))
        y.append(np.full(n_per_class, k, dtype=np.int64))
    return Dataset(np.concatenate(X), np.concatenate(y), ["x0", "x1"], "class", "spiral")


def _check_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")


def read_csv(path, target=None, require_target=True):
    """A CSV file with a header row and numeric feature columns. The target is the column named `target` (default:
    the last column); with require_target=False a file without that column gives y None. A target column of whole
    numbers (no decimal point) is read as integer class labels, of other numbers as floats, and of anything else
    (yes/no, cat/dog) as string class labels. An empty cell is an error naming its column and line."""
    _check_file(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        numbered = [(reader.line_num, row) for row in reader]
    numbered = [(n, row) for n, row in numbered if any(cell.strip() for cell in row)]   # blank lines carry nothing
    line_numbers = [n for n, _ in numbered[1:]]
    rows = [row for _, row in numbered]
    if len(rows) < 2:
        raise ValueError(f"{path}: expected a header row and at least one data row, got {len(rows)} row(s)")
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: the header names a column twice: {header}")
    for line, row in zip(line_numbers, rows[1:]):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line} has {len(row)} fields, the header has {len(header)}")
    if target is None:
        target_col = len(header) - 1 if require_target else None
    elif target in header:
        target_col = header.index(target)
    elif require_target:
        raise ValueError(f"--target: {path} has no column {target!r}; its columns are {', '.join(header)}")
    else:
        target_col = None
    if require_target and len(header) < 2:
        raise ValueError(f"{path}: expected feature columns and a target column, got the one column {header[0]!r}")
    feature_cols = [j for j in range(len(header)) if j != target_col]
    columns = {j: _numeric_column(path, header[j], [row[j] for row in rows[1:]], line_numbers) for j in feature_cols}
    X = np.column_stack([columns[j] for j in feature_cols]) if feature_cols else np.empty((len(rows) - 1, 0))
    y = None
    if target_col is not None:
        cells = [row[target_col].strip() for row in rows[1:]]
        if all(_is_number(cell) or not cell for cell in cells):
            y = _numeric_column(path, header[target_col], cells, line_numbers)
            if all(_is_whole_number(cell) for cell in cells):
                y = y.astype(np.int64)
        else:
            _check_no_empty_cell(path, header[target_col], cells, line_numbers)
            y = np.asarray(cells)                 # string class labels
    return Dataset(X, y, [header[j] for j in feature_cols], None if target_col is None else header[target_col], path)


def _is_whole_number(text):
    try:
        int(text.strip())
        return True
    except ValueError:
        return False


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_no_empty_cell(path, name, cells, line_numbers):
    for cell, line in zip(cells, line_numbers):
        if not cell.strip():
            raise ValueError(f"{path}: missing value in column {name}, line {line}")


def _numeric_column(path, name, cells, line_numbers):
    _check_no_empty_cell(path, name, cells, line_numbers)
    values = np.empty(len(cells))
    for i, (cell, line) in enumerate(zip(cells, line_numbers)):
        try:
            values[i] = float(cell)
        except ValueError:
            raise ValueError(f"{path}: column {name!r} is not numeric (line {line}: {cell!r}); gpubp reads numeric "
                             "feature columns only") from None
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: column {name!r} holds NaN or inf")
    return values


def read_npz(path, require_target=True):
    """An .npz archive with a float array X (N, in) and targets y (N,) or (N, out)."""
    _check_file(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as .npz ({type(exc).__name__}: {exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: is a single .npy array; expected an .npz archive with arrays X and y")
    with archive:
        if "X" not in archive.files:
            raise ValueError(f"{path}: no array 'X' (it holds {', '.join(archive.files) or 'nothing'})")
        try:
            X = archive["X"]
            y = archive["y"] if "y" in archive.files else None
        except Exception as exc:
            raise ValueError(f"{path}: an array cannot be read ({type(exc).__name__}: {exc})") from None
    if y is None and require_target:
        raise ValueError(f"{path}: no array 'y' with the targets")
    if X.dtype.kind not in "biuf" or X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"{path}: X must be a numeric array (N, features), got {X.dtype} {X.shape}")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise ValueError(f"{path}: X holds NaN or inf")
    if y is not None:
        if y.dtype.kind not in "biuf" or y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
            raise ValueError(f"{path}: y must be numeric, (N,) or (N, outputs) with N = {X.shape[0]}, "
                             f"got {y.dtype} {y.shape}")
        y = y.astype(np.int64) if y.dtype.kind in "biu" else y.astype(np.float64)
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ValueError(f"{path}: y holds NaN or inf")
    return Dataset(X, y, [f"x{i}" for i in range(X.shape[1])], "y", path)


# ---- targets ---------------------------------------------------------------------------------------------------
def infer_loss(y):
    """The loss a target implies: integer labels with more than two classes -> softmax_ce; two classes -> bce;
    floats (or several columns) -> mse."""
    if y.ndim == 1 and y.dtype.kind in "iuU":
        n_classes = len(np.unique(y))
        if n_classes < 2:
            raise ValueError(f"target: only one class ({y[0]}) in the data; nothing to learn")
        if n_classes > MAX_INFERRED_CLASSES and y.dtype.kind != "U":
            # Whole numbers with this many values are more likely a quantity (a price, a count) than classes.
            raise ValueError(f"target: {n_classes} distinct whole-number values; say what they are: --loss mse "
                             "for a quantity, --loss softmax_ce for class labels")
        return "bce" if n_classes == 2 else "softmax_ce"
    return "mse"


class Targets:
    """How targets become what the loss trains on, and predictions become answers again; JSON-able state.

    softmax_ce: class labels -> indices into `classes` (N,); predictions -> the arg-max class's label
    bce:        two class labels -> 0/1 (N, 1), or probabilities in [0, 1] as they are; predictions -> the
                label of the class above 0.5 (or the probability, where there are no labels)
    mse:        values -> standardised (N, out) with the training rows' mean/std; predictions -> original units
    """

    def __init__(self, loss, classes=None, mean=None, std=None):
        self.loss, self.classes, self.mean, self.std = loss, classes, mean, std

    @classmethod
    def fit(cls, y, loss):
        if loss == "softmax_ce":
            if y.ndim != 1 or not _whole(y):
                raise ValueError(f"--loss softmax_ce: needs one column of class labels (whole numbers), got "
                                 f"{y.dtype} {y.shape}")
            classes = np.unique(y)
            if len(classes) < 2:
                raise ValueError("target: only one class in the data; nothing to learn")
            return cls(loss, classes=[_plain(c) for c in classes])
        if loss == "bce":
            classes = np.unique(y)
            if y.ndim == 1 and len(classes) == 2 and _whole(y):
                return cls(loss, classes=[_plain(c) for c in classes])
            if y.dtype.kind != "U" and y.min() >= 0 and y.max() <= 1:
                return cls(loss)
            raise ValueError(f"--loss bce: needs two classes or probabilities in [0, 1], got {len(classes)} "
                             f"distinct values from {classes[0]} to {classes[-1]}")
        if loss == "mse":
            if y.dtype.kind not in "biuf":
                raise ValueError("--loss mse: needs numeric targets; this target holds text labels (classes: use "
                                 "bce or softmax_ce, or leave --loss out)")
            y2 = y.reshape(len(y), -1).astype(np.float64)
            std = y2.std(axis=0)
            return cls(loss, mean=y2.mean(axis=0).tolist(), std=np.where(std > 0, std, 1.0).tolist())
        raise ValueError(f"loss: expected one of bce, mse, softmax_ce, got {loss!r}")

    @property
    def n_out(self):
        if self.loss == "softmax_ce":
            return len(self.classes)
        return 1 if self.loss == "bce" else len(self.mean)

    def encode(self, y):
        if self.loss == "softmax_ce":
            classes = np.asarray(self.classes)
            index = np.searchsorted(classes, y)
            unknown = (index >= len(classes)) | (classes[np.minimum(index, len(classes) - 1)] != y)
            if unknown.any():
                raise ValueError(f"target: label {y[unknown][0]!r} is not one of the model's classes {self.classes}")
            return index.astype(np.int64)
        if self.loss == "bce":
            if self.classes is None:
                return y.reshape(-1, 1).astype(np.float64)
            unknown = ~np.isin(y, self.classes)
            if unknown.any():
                raise ValueError(f"target: label {y[unknown][0]!r} is not one of the model's classes {self.classes}")
            return (y == self.classes[1]).astype(np.float64).reshape(-1, 1)
        return (y.reshape(len(y), -1) - np.asarray(self.mean)) / np.asarray(self.std)

    def decode(self, outputs):
        """The network's outputs (N, out) as answers: labels (N,) or values (N, out) in the target's units."""
        if self.loss == "softmax_ce":
            return np.asarray(self.classes)[outputs.argmax(axis=1)]
        if self.loss == "bce":
            if self.classes is None:
                return outputs[:, 0]
            return np.asarray(self.classes)[(outputs[:, 0] > 0.5).astype(np.int64)]
        return outputs * np.asarray(self.std) + np.asarray(self.mean)

    def to_dict(self):
        return {"loss": self.loss, "classes": self.classes, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d):
        return cls(d["loss"], d.get("classes"), d.get("mean"), d.get("std"))


def _whole(y):
    """Class labels: whole numbers or strings."""
    return y.dtype.kind in "iuU" or bool(np.all(np.mod(y, 1) == 0))


def _plain(value):
    """A numpy scalar as a plain str, int or float, for JSON."""
    value = value.item()
    if isinstance(value, str):
        return value
    return int(value) if float(value).is_integer() else value


# ---- split and standardisation --------------------------------------------------------------------------------
def split_indices(y, fraction, seed, stratify=False):
    """(train, held_out) row indices: a seeded shuffle; with stratify, each class split in the same proportion,
    so a small set (iris) keeps every class on both sides."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-split: expected a fraction between 0 and 1, got {fraction!r}")
    n = len(y)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(n)]
    train, held_out = [], []
    for rows in groups:
        rows = rng.permutation(rows)
        k = int(round(fraction * len(rows)))
        held_out.append(rows[:k])
        train.append(rows[k:])
    train, held_out = np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))
    if len(train) == 0 or len(held_out) == 0:
        raise ValueError(f"--val-split {fraction}: leaves {len(train)} training and {len(held_out)} held-out rows "
                         f"of {n}; need at least one of each")
    return train, held_out


class Standardizer:
    """x' = (x − mean) / std per feature, fitted on the training rows only (no peeking at held-out data);
    constant features get std 1 so they stay 0 rather than dividing by zero."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)

    @classmethod
    def fit(cls, X):
        std = X.std(axis=0)
        return cls(X.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, X):
        if X.shape[1] != len(self.mean):
            raise ValueError(f"data: expected {len(self.mean)} feature columns, got {X.shape[1]}")
        return (X - self.mean) / self.std

    def to_dict(self):
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d):
        return cls(d["mean"], d["std"])
