"""Triton kernels (no TensorRT dependency): checked on the CPU by TRITON_INTERPRET=1, compiled ahead
of time for sm_75 by plugins/kernels/aot.py."""
