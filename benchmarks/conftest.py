"""Benchmark set-up: without CUDA every benchmark skips; the Triton interpreter is
switched on before anything imports triton so that collection still works."""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ["TRITON_INTERPRET"] = "1"
