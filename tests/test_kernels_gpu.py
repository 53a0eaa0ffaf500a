"""On a CUDA machine: tests/test_kernels.py and test_kernels_dispatch.py again, with compiled kernels on GPU tensors.

Triton fixes interpreter-or-compiler per process when kernels are decorated, and the CPU kernel tests
need the interpreter, so the GPU run is a separate process with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU kernel tests need one")
def test_kernel_suite_on_gpu():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "FEWSTEP_KERNELS"}
    env.update(FEWSTEP_TEST_DEVICE="cuda", TRITON_INTERPRET="0")  # tests/conftest.py sets 1 when it is unset
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, f) for f in ("test_kernels.py", "test_kernels_dispatch.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", *files, "-q",
                           "-p", "no:cacheprovider", "-p", "no:xdist"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
