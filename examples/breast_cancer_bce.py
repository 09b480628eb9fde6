"""Binary classification with a sigmoid output and binary cross-entropy, on scikit-learn's bundled breast
cancer set (569 tumours, 30 features): a seeded held-out split, features standardised with the training
rows' mean and std, SGD with momentum, and the held-out accuracy.

Run: python examples/breast_cancer_bce.py [--backend numpy|numba|cupy|auto]
"""
import argparse

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import gpubp

parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="auto")
args = parser.parse_args()

X, y = load_breast_cancer(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
mean, std = X_train.mean(axis=0), X_train.std(axis=0)      # from the training rows only
X_train, X_test = (X_train - mean) / std, (X_test - mean) / std

net = gpubp.Sequential(
    gpubp.Dense(30, 32, activation="relu"),
    gpubp.Dense(32, 1, activation="sigmoid"),       # bce's fused form needs a sigmoid output
    backend=args.backend, seed=0,
)
opt = gpubp.SGD(net, lr=0.05, momentum=0.9)
history = net.fit(X_train, y_train.astype(np.float32), loss="bce", optimizer=opt, epochs=30, batch_size=32,
                  validation_data=(X_test, y_test.astype(np.float32)))
print(f"epoch 30: training loss {history['loss'][-1]:.4f}, training accuracy {history['accuracy'][-1]:.4f}")

predicted = (net.predict(X_test)[:, 0] > 0.5).astype(int)
accuracy = np.mean(predicted == y_test)
print(f"held-out accuracy: {accuracy:.4f} ({len(y_test)} tumours, backend {net.backend.name})")
