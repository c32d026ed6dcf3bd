"""CUDA kernels executed on the CPU (see tests/test_kernels_on_cpu.py)."""
