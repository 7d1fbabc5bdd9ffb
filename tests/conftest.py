"""Test set-up: on a machine without CUDA the Triton kernels run under the CPU
interpreter, which must be switched on before anything imports triton
(torch.compile imports it too)."""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ["TRITON_INTERPRET"] = "1"
