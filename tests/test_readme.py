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
