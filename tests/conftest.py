"""Without a GPU the Triton kernels run under the interpreter. TRITON_INTERPRET must be set before
triton is first imported (triton.language's own @jit helpers are decorated at import), and test
modules import triton while they are collected, so it is set here, before any of them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
