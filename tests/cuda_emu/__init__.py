"""A host emulation of CUDA for running kernels/*.cu unmodified in tests (see harness.py)."""
