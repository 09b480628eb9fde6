"""gpubp: backpropagation for multilayer perceptrons, with hand-written CUDA kernels and a NumPy reference.

    net = gpubp.Sequential(gpubp.Dense(30, 32, "relu"), gpubp.Dense(32, 1, "sigmoid"), backend="auto")
    opt = gpubp.SGD(net, lr=0.05, momentum=0.9)
    loss = net.train_step(X, y, loss="bce", optimizer=opt)
"""
from . import callbacks, distributed, export, schedules   # gpubp.callbacks.EarlyStopping, gpubp.schedules.Cosine, ...
from .backends import BackendUnavailable, availability, get_backend
from .layers import Dense
from .network import History, Sequential
from .optim import SGD, Adam
from .serialize import load

__version__ = "0.1.0"
__all__ = ["Sequential", "Dense", "SGD", "Adam", "load", "History", "get_backend", "availability",
           "BackendUnavailable", "callbacks", "distributed", "export", "schedules", "__version__"]
