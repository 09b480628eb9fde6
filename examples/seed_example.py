"""The seed's worked example, step by step, through the public API (SPEC section 1).

    x = 2 --[m1 = 3, identity, no bias]--> h --[m2 = 0.5, ReLU, no bias]--> ŷ        target y = 1
    forward   h = m1·x = 6        ŷ = ReLU(m2·h) = 3          L = ½(ŷ − y)² = 2
    backward  dL/dŷ = ŷ − y = 2   dL/dm2 = dL/dŷ · ReLU'(m2·h) · h = 12
                                   dL/dm1 = dL/dŷ · ReLU'(m2·h) · m2 · x = 2
    update    m1 ← 3 − 0.1·2 = 2.8      m2 ← 0.5 − 0.1·12 = −0.7

Run: python examples/seed_example.py
"""
import numpy as np

import gpubp

net = gpubp.Sequential(
    gpubp.Dense(1, 1, activation="identity", bias=False),
    gpubp.Dense(1, 1, activation="relu", bias=False),
    backend="numpy", dtype="float64",
)
net.set_params([{"W": np.array([[3.0]])}, {"W": np.array([[0.5]])}])
x = np.array([[2.0]])
y = np.array([[1.0]])

y_hat = net.predict(x)[0, 0]
print(f"forward:  h = m1·x = {3.0 * 2.0:g}, y_hat = ReLU(m2·h) = {y_hat:g}")
assert y_hat == 3.0

loss, _ = net.evaluate(x, y, loss="mse")
print(f"loss:     L = ½(y_hat − y)² = {loss:g}")
assert loss == 2.0

grads = net.gradients(x, y, loss="mse")
dm1, dm2 = grads[0]["W"][0, 0], grads[1]["W"][0, 0]
print(f"backward: dL/dm2 = {dm2:g}, dL/dm1 = {dm1:g}")
assert (dm2, dm1) == (12.0, 2.0)

opt = gpubp.SGD(net, lr=0.1)
step_loss = net.train_step(x, y, loss="mse", optimizer=opt)
m1, m2 = net.get_params()[0]["W"][0, 0], net.get_params()[1]["W"][0, 0]
print(f"update:   loss at the step = {step_loss:g}; m1 = {m1:g}, m2 = {m2:g}")
assert step_loss == 2.0
assert np.isclose(m1, 2.8, rtol=0, atol=1e-15) and np.isclose(m2, -0.7, rtol=0, atol=1e-15)
print("the seed's worked example comes out exactly")
