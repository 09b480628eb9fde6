"""One flat buffer per model for parameters, one for gradients, one per optimizer state: per-layer views into
them. One buffer means one optimizer launch per step and one copy per checkpoint."""
import math

import numpy as np


class FlatLayout:
    """Where each layer's W and b sit in a flat buffer: entries [(layer index, name, shape, offset)]."""

    def __init__(self, layers):
        self.entries, offset = [], 0
        for i, layer in enumerate(layers):
            for name, shape in layer.param_shapes():
                self.entries.append((i, name, shape, offset))
                offset += math.prod(shape)
        self.size = offset
        self.n_layers = len(layers)

    def views(self, be, flat):
        """[{name: view}] per layer, over a flat backend array."""
        out = [{} for _ in range(self.n_layers)]
        for i, name, shape, offset in self.entries:
            out[i][name] = be.view(flat, offset, shape)
        return out

    def flatten(self, per_layer, dtype):
        """A flat numpy array from [{name: array}] per layer (the inverse of views, on the host)."""
        flat = np.empty(self.size, dtype=dtype)
        for i, name, shape, offset in self.entries:
            flat[offset:offset + math.prod(shape)] = np.asarray(per_layer[i][name]).reshape(-1)
        return flat

    def unflatten(self, flat):
        """[{name: numpy copy}] per layer from a flat numpy array."""
        out = [{} for _ in range(self.n_layers)]
        for i, name, shape, offset in self.entries:
            out[i][name] = flat[offset:offset + math.prod(shape)].reshape(shape).copy()
        return out
