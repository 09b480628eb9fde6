"""CUDA C sources of the cupy backend, shipped as package data (gpubp.kernels); read with importlib.resources."""
