"""Accelerators applied to a plain model from outside: the model (simplegpt.model) imports none of them.

`simplegpt.accel.cpu` holds the C kernels for CPU decoding and training.
"""
