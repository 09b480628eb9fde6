"""Ten-class classification with softmax cross-entropy, on scikit-learn's bundled 8×8 digits (1797 images,
64 pixels): the last layer is "identity" because the softmax is part of the loss; labels go in as integers.

Run: python examples/digits_softmax.py [--backend numpy|numba|cupy|auto]
"""
import argparse

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import gpubp

parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="auto")
args = parser.parse_args()

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
# Pixels are 0..16; some are always 0 in training (std 0): scale those by 1 rather than divide by zero.
mean, std = X_train.mean(axis=0), X_train.std(axis=0)
std[std == 0] = 1.0
X_train, X_test = (X_train - mean) / std, (X_test - mean) / std

net = gpubp.Sequential(
    gpubp.Dense(64, 64, activation="relu"),
    gpubp.Dense(64, 10, activation="identity"),
    backend=args.backend, seed=0,
)
opt = gpubp.SGD(net, lr=0.05, momentum=0.9)
history = net.fit(X_train, y_train, loss="softmax_ce", optimizer=opt, epochs=20, batch_size=32,
                  validation_data=(X_test, y_test))
print(f"epoch 20: training loss {history['loss'][-1]:.4f}, validation accuracy {history['val_accuracy'][-1]:.4f}")

predicted = net.predict(X_test).argmax(axis=1)
accuracy = np.mean(predicted == y_test)
print(f"held-out accuracy: {accuracy:.4f} ({len(y_test)} digits, backend {net.backend.name})")
