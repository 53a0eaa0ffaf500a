"""Fused Triton kernels for the hot-path ops in ``core.ops``, one file per op.

Each file holds, top to bottom: the torch reference, the private ``@triton.jit`` kernels (``_<op>_kernel``,
raw pointers, fp32 math, masked loads), a launcher that allocates outputs and picks the grid, and the
``torch.library.custom_op`` registration (``fewstep::<op>``) with its fake implementation and autograd.
``dispatch`` decides per call which one runs. Importing this package does not import triton.
"""
