"""One flat buffer per model for parameters, one for gradients, one per optimizer state: per-layer views into
them. One buffer means one optimizer launch per step and one copy per checkpoint.

Every view starts ALIGN elements after the buffer's start times some integer (128 bytes in float32, 256 in
float64), with zeros between views. NOTE: the GEMMs load 16 bytes at a time only from 16-byte-aligned rows;
a packed layout put W of most layers after the first at odd offsets (13-7-3: W1 at 98 elements), silently
sending every GEMM of those layers down the scalar path. The padding is never written by a kernel, so it stays
zero through every update (zero gradient, zero state) and through finiteness checks.

Checkpoints hold the packed form (`pack` / `unpack`): the file format does not depend on the padding."""
import math

import numpy as np

ALIGN = 32   # elements: 128 bytes in float32 (a cache line), 256 in float64


def _aligned(offset):
    return -(-offset // ALIGN) * ALIGN


class FlatLayout:
    """Where each layer's W and b sit in a flat buffer: entries [(layer index, name, shape, offset)].
    size: the buffer's length (padding included); n_params: the parameters alone (the packed length)."""

    def __init__(self, layers):
        self.entries, offset = [], 0
        for i, layer in enumerate(layers):
            for name, shape in layer.param_shapes():
                offset = _aligned(offset)
                self.entries.append((i, name, shape, offset))
                offset += math.prod(shape)
        self.size = offset
        self.n_params = sum(math.prod(shape) for _, _, shape, _ in self.entries)
        self.n_layers = len(layers)

    def views(self, be, flat):
        """[{name: view}] per layer, over a flat backend array."""
        out = [{} for _ in range(self.n_layers)]
        for i, name, shape, offset in self.entries:
            out[i][name] = be.view(flat, offset, shape)
        return out

    def flatten(self, per_layer, dtype):
        """A flat numpy array from [{name: array}] per layer (the inverse of views, on the host), zero padding."""
        flat = np.zeros(self.size, dtype=dtype)
        for i, name, shape, offset in self.entries:
            flat[offset:offset + math.prod(shape)] = np.asarray(per_layer[i][name]).reshape(-1)
        return flat

    def unflatten(self, flat):
        """[{name: numpy copy}] per layer from a flat numpy array."""
        out = [{} for _ in range(self.n_layers)]
        for i, name, shape, offset in self.entries:
            out[i][name] = flat[offset:offset + math.prod(shape)].reshape(shape).copy()
        return out

    def pack(self, flat):
        """The parameters of a flat (padded) numpy array, one after another with no padding (n_params,)."""
        return np.concatenate([flat[offset:offset + math.prod(shape)] for _, _, shape, offset in self.entries])

    def unpack(self, packed):
        """A flat (padded) numpy array from a packed one (n_params,): the inverse of pack."""
        flat = np.zeros(self.size, dtype=packed.dtype)
        start = 0
        for _, _, shape, offset in self.entries:
            n = math.prod(shape)
            flat[offset:offset + n] = packed[start:start + n]
            start += n
        return flat

    def layer_of(self, index):
        """The layer whose W or b holds flat element `index` (None for padding)."""
        for i, _, shape, offset in self.entries:
            if offset <= index < offset + math.prod(shape):
                return i
        return None
