"""The README's first script for a Keras user runs as printed: it is taken from the README itself."""
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading):
    """The first ```python block after `heading` in the README."""
    text = README.read_text()
    after = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_keras_users_first_script_runs(capsys):
    pytest.importorskip("sklearn", reason="the script loads scikit-learn's bundled breast-cancer set")
    code = readme_block("## Coming from Keras: a first script")
    assert len(code.strip().splitlines()) <= 10
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    net, history = scope["net"], scope["history"]
    out, err = capsys.readouterr()
    assert "epoch 1/50" in err and "loss" in err                                # the progress bar
    assert 0 < len(history["val_loss"]) <= 50 and history["val_accuracy"][-1] > 0.9
    assert net.classes.tolist() == ["benign", "malignant"]
    classes = net.predict_classes(scope["Xv"])
    assert np.mean(classes == np.asarray(scope["yv"])) > 0.9
    assert "benign" in out or "malignant" in out


def test_the_keras_users_first_script_on_every_backend(backend_name, monkeypatch, capsys):
    """The same block on each backend ("auto" made to pick it), two epochs of two batches of a 96-row subset
    (the CUDA simulator is slow): labels, probabilities and the progress bar come out the same way (the numpy case above checks the
    accuracy over the full run)."""
    pytest.importorskip("sklearn", reason="the script loads scikit-learn's bundled breast-cancer set")
    import gpubp.network
    from gpubp.backends import get_backend
    monkeypatch.setattr(gpubp.network, "get_backend",
                        lambda name="auto", **kw: get_backend(backend_name if name == "auto" else name, **kw))
    code = (readme_block("## Coming from Keras: a first script").replace("epochs=50,", "epochs=2, batch_size=64,")
            .replace("train_test_split(X, [", "train_test_split(X[:96], [").replace("for t in y]", "for t in y[:96]]"))
    assert "X[:96]" in code and "y[:96]" in code and "epochs=2," in code
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    net = scope["net"]
    assert net.backend.name == backend_name and len(scope["history"]["val_loss"]) == 2
    proba = net.predict_proba(scope["Xv"][:3])
    assert proba.shape == (3, 1) and ((proba > 0) & (proba < 1)).all()
    assert set(net.predict_classes(scope["Xv"])) <= {"benign", "malignant"}
    assert "epoch 2/2" in capsys.readouterr().err
