"""Test-wide setup.

Without a GPU, Triton kernels run under the CPU interpreter. ``TRITON_INTERPRET`` is read when a
kernel is decorated, so it must be set before any kernel module is imported: here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))
