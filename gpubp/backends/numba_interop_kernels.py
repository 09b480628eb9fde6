"""Device-to-device copies between arrays of any dtype and strides, for the numba backend: another library's
device array that does not fit as it is (a float64 torch tensor for a float32 model, a transposed jax array)
becomes a C-contiguous array of the model's dtype in one launch, never through the host.

    dst[...] = src          src: any numeric dtype, any strides;  dst: C-contiguous, the same shape

Launch: 1-D grid-stride over dst.size. Traffic: src read once, dst written once. numba compiles one version per
(src type, dst type) pair on first use; these kernels are kept apart from numba_kernels.py, whose launch table
lists only C-contiguous arrays of the model's dtype."""
from numba import cuda


@cuda.jit
def copy_cast_1d_kernel(src, dst):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, dst.shape[0], stride):
        dst[i] = src[i]


@cuda.jit
def copy_cast_2d_kernel(src, dst):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    cols = dst.shape[1]
    for k in range(start, dst.shape[0] * cols, stride):
        i = k // cols
        j = k - i * cols
        dst[i, j] = src[i, j]
