"""Device and dtype names: check_device fails in one sentence, decode_dtype picks bf16 only where
the hardware computes it natively."""

from __future__ import annotations

import pytest
import torch

from kforcing.core.device import check_device, decode_dtype, native_bf16
from kforcing.errors import KForcingError


def test_check_device_names():
    assert check_device("cpu") == "cpu"
    with pytest.raises(KForcingError, match="unknown device 'gpu'"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(KForcingError, match="not available"):
            check_device("cuda")


def test_decode_dtype():
    assert decode_dtype("fp32") == torch.float32
    assert decode_dtype("bf16") == torch.bfloat16
    assert decode_dtype("auto") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    with pytest.raises(KForcingError, match="dtype must be one of auto, fp32, bf16, got 'fp16'"):
        decode_dtype("fp16")


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    real_open = open

    def fake(flags: str):
        def opener(path, *a, **kw):
            if path == "/proc/cpuinfo":
                f = tmp_path / "cpuinfo"
                f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
                return real_open(f, *a, **kw)
            return real_open(path, *a, **kw)
        return opener

    monkeypatch.setattr("builtins.open", fake("fpu sse avx512f amx_bf16"))
    assert native_bf16("cpu")
    monkeypatch.setattr("builtins.open", fake("fpu sse avx2"))
    assert not native_bf16("cpu")
    assert not native_bf16("mps")
