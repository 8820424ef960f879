"""Device, dtype and weight layout: check_device fails in one sentence, decode_dtype picks bf16
only where the hardware computes it natively, decode_weights changes the memory order of the
weights and nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kforcing.core import device
from kforcing.core.device import (
    arrange_weights,
    check_device,
    compile_options,
    decode_dtype,
    decode_layout,
    decode_weights,
    in_major,
    last_level_cache_bytes,
    layout_of,
    native_bf16,
)
from kforcing.decoding.ar import generate_ar
from kforcing.errors import KForcingError
from kforcing.io.checkpoint import load_model, save_model
from kforcing.students.feedback import FeedbackConfig, FeedbackStudent


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


# -- weight layout --------------------------------------------------------------------------------

def test_last_level_cache_is_read_from_sysfs(tmp_path):
    for name, level, size in (("index0", 1, "48K"), ("index2", 2, "2048K"),
                              ("index3", 3, "300M"), ("index4", 0, "junk")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(f"{level}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(str(tmp_path)) == 300 << 20
    assert last_level_cache_bytes(str(tmp_path / "none")) is None


def test_decode_layout_picks_in_major_for_fp32_weights_beyond_the_cache(monkeypatch):
    monkeypatch.setattr(device, "last_level_cache_bytes", lambda: 1000)
    assert decode_layout("auto", torch.float32, "cpu", 1001) == "in-major"
    assert decode_layout("auto", torch.float32, "cpu", 1000) == "out-major"   # the cache holds it
    assert decode_layout("auto", torch.float32, "cpu") == "out-major"         # size unknown
    assert decode_layout("auto", torch.bfloat16, "cpu", 10**9) == "out-major"
    assert decode_layout("auto", torch.float32, "meta", 10**9) == "out-major"
    assert decode_layout("out-major", torch.float32) == "out-major"
    assert decode_layout("in-major", torch.bfloat16) == "in-major"
    monkeypatch.setattr(device, "last_level_cache_bytes", lambda: None)     # unreadable
    assert decode_layout("auto", torch.float32, "cpu", 10**9) == "out-major"
    with pytest.raises(KForcingError, match="layout must be one of auto, out-major, in-major, "
                       "got 'rows'"):
        decode_layout("rows", torch.float32)


@pytest.mark.parametrize("tied", [True, False])
def test_arranged_weights_decode_the_same_and_save_as_before(make_model, tmp_path, tied,
                                                             monkeypatch):
    monkeypatch.setattr(device, "last_level_cache_bytes", lambda: 1)   # auto: in-major
    model = make_model(tie_embeddings=tied)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids)
        decode_weights(model, torch.float32)
        linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
        assert all(in_major(w) and layout_of(w) == "in-major" for w in linears)
        assert (model.output.weight is model.tok_embeddings.weight) == tied
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
        assert generate_ar(model, ids.tolist(), 6).tokens == generate_ar(
            make_model(tie_embeddings=tied), ids.tolist(), 6).tokens
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())   # the values, unchanged
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in before.items())
    assert all(w.is_contiguous() for w in again.parameters())           # saved out-major
    arrange_weights(model, "out-major")
    assert all(w.is_contiguous() for w in model.parameters())


def test_a_students_frozen_teacher_and_draft_head_follow_the_layout(make_model):
    teacher = make_model()
    ids = torch.arange(0, teacher.config.vocab_size, 3)
    student = FeedbackStudent(teacher, FeedbackConfig(max_k=2, draft_vocab_size=len(ids)),
                              draft_ids=ids).eval()
    decode_weights(student, torch.float32, "in-major")
    assert in_major(teacher.output.weight) and in_major(student.fc.weight)
    head = student.head_weight()
    assert in_major(head) and torch.equal(head, teacher.output.weight[student.draft_ids])
    decode_weights(student, torch.bfloat16)                         # auto: out-major in bf16
    assert teacher.output.weight.dtype == torch.bfloat16
    assert teacher.output.weight.is_contiguous() and student.head_weight().is_contiguous()


def test_compile_options_wrap_cpu_graphs_in_cpp():
    assert compile_options("cpu") == {"freezing": True, "cpp_wrapper": True}
    assert compile_options(torch.device("cuda", 0)) == {}


def test_a_student_and_its_teacher_choose_the_same_layout(make_model, monkeypatch):
    teacher = make_model()
    student = FeedbackStudent(teacher, FeedbackConfig(max_k=2)).eval()
    weights = {id(m.weight): m.weight for m in teacher.modules() if isinstance(m, nn.Linear)}
    teacher_bytes = sum(w.numel() * 4 for w in weights.values())
    monkeypatch.setattr(device, "last_level_cache_bytes", lambda: teacher_bytes)  # holds it
    decode_weights(student, torch.float32)
    decode_weights(teacher, torch.float32)
    assert layout_of(teacher.output.weight) == layout_of(student.fc.weight) == "out-major"
