"""Small helpers shared by the tests (tests/ is on sys.path under pytest)."""
import io
import lzma

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN anywhere makes it NaN (and fails any bound)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def write_raw_artifact(path, obj, preset=9):
    """An artifact container written by hand (torch.save + LZMA), e.g. a corrupted one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(lzma.compress(buf.getvalue(), preset=preset))
    return path
