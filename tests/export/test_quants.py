"""graphtune.export.quants: bit-exactness with gguf-py and with libggml's own quantizer."""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from graphtune.export import quants as Q  # noqa: E402

QT = gguf.GGMLQuantizationType
LEGACY = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
KQUANTS = [QT.Q6_K, QT.Q5_K, QT.Q4_K]
BLOCK_TYPES = LEGACY + KQUANTS


def _data(kind: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if kind == "heavy":  # outliers, like real weights
        return (rng.standard_t(3, shape) * 0.02).astype(np.float32)
    if kind == "positive":
        return (np.abs(rng.standard_normal(shape)) + 0.3).astype(np.float32)
    if kind == "special":
        # zero blocks, constant blocks, ties between +a/-a, tiny and huge rows, sparse rows
        x = rng.standard_normal(shape).astype(np.float32)
        flat = x.reshape(-1, shape[-1])
        flat[0, :64] = 0.0
        flat[0, 64:128] = 1.5
        flat[0, 128:160] = -0.75
        flat[1 % flat.shape[0], :32] = np.tile(np.float32([0.5, -0.5]), 16)
        flat[1 % flat.shape[0], 32:] *= 1e3
        flat[2 % flat.shape[0], :] *= 1e-6
        flat[3 % flat.shape[0], ::5] = 0.0
        flat[-1, 256:288] = 1e-20
        return x
    raise ValueError(kind)


KINDS = ["normal", "heavy", "positive", "special"]
C_TYPES = [QT.Q8_0, QT.Q6_K, QT.Q5_K, QT.Q4_K]  # also implemented in C (graphtune.export._cquants)


def _c_available() -> bool:
    from graphtune.export import _cquants

    return _cquants.library() is not None


@pytest.fixture(params=["c", "torch"])
def backend(request):
    """Both quantizer implementations (the C one skips where no C compiler built it)."""
    if request.param == "c" and not _c_available():
        pytest.skip("C quantizers unavailable: " + str(__import__("graphtune.export._cquants").export._cquants.unavailable_reason()))
    return request.param


# ------------------------------------------------------------------------------------------
# float types and legacy block types: byte-identical with gguf-py's numpy quantizers


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 33)])
def test_float_types_match_gguf_py(qtype, shape):
    x = _data("heavy", shape, seed=1)
    x.reshape(-1)[0] = 70000.0  # F16 overflow -> inf, BF16 rounding at large magnitude
    if qtype == QT.BF16:
        x.reshape(-1)[1] = np.nan
        x.reshape(-1)[2] = -np.inf
    ref = gguf.quants.quantize(x, qtype)
    got = Q.quantize(x, qtype)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert got.tobytes() == ref.tobytes()
    got_t = Q.quantize(torch.from_numpy(x), qtype)
    assert got_t.dtype == ref.dtype and got_t.tobytes() == ref.tobytes()
    back = Q.dequantize(got, qtype)
    assert back.dtype == np.float32 and back.shape == x.shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_types_bit_exact_with_gguf_py(qtype, kind, backend):
    x = _data(kind, (6, 320))
    ref = gguf.quants.quantize(x, qtype)
    got = Q.quantize(x, qtype, backend=backend)
    assert got.dtype == np.uint8 and got.shape == ref.shape
    assert np.array_equal(got, ref)
    # our dequantizer gives exactly gguf-py's floats
    assert np.array_equal(Q.dequantize(got, qtype), gguf.quants.dequantize(ref, qtype))


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_odd_shapes_and_inputs(qtype, backend):
    def quant(a, **kw):
        return Q.quantize(a, qtype, backend=backend, **kw)

    x = _data("normal", (3, 2, 96), seed=3)
    ref = gguf.quants.quantize(x, qtype)
    assert np.array_equal(quant(x), ref)
    # float64 and torch inputs (bf16/fp16 sources are widened to float32 exactly, as convert does)
    assert np.array_equal(quant(x.astype(np.float64)), ref)
    assert np.array_equal(quant(torch.from_numpy(x)), ref)
    xh = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(quant(xh), gguf.quants.quantize(xh.float().numpy(), qtype))
    # non-contiguous input, tiny chunks (chunk boundaries inside a row)
    xt = torch.from_numpy(_data("normal", (64, 6), seed=4)).t()
    assert np.array_equal(quant(xt), gguf.quants.quantize(xt.contiguous().numpy(), qtype))
    assert np.array_equal(quant(x, chunk_elems=64), ref)
    # one row
    assert np.array_equal(quant(x[0, 0]), gguf.quants.quantize(x[0, 0], qtype))


# ------------------------------------------------------------------------------------------
# K-quants: layout checked through gguf-py's dequantizer, error bounds


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquants_layout_and_error(qtype, kind, backend):
    x = _data(kind, (4, 512), seed=5)
    raw = Q.quantize(x, qtype, backend=backend)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert block == 256 and raw.dtype == np.uint8 and raw.shape == (4, 512 // 256 * size)
    ref_deq = gguf.quants.dequantize(raw, qtype)  # gguf-py reads ggml's block layout
    deq = Q.dequantize(raw, qtype)
    assert np.array_equal(deq, ref_deq)
    rel = np.sqrt(np.mean((deq - x) ** 2) / np.mean(x ** 2))
    assert rel < {QT.Q6_K: 0.03, QT.Q5_K: 0.06, QT.Q4_K: 0.12}[qtype]
    if kind == "special":
        return  # groups 1e9 times smaller than their super-block's largest round to zero, by design
    # every element within ~one quantization step of its group (range / levels; the 6-bit
    # scale/min rounding may shrink the range a little), i.e. read back in the right places
    groups = 16 if qtype == QT.Q6_K else 32
    err = np.abs(deq - x).reshape(-1, groups)
    g = x.reshape(-1, groups)
    span = g.max(1) - np.minimum(g.min(1), 0)
    levels = {QT.Q6_K: 31, QT.Q5_K: 31, QT.Q4_K: 15}[qtype]
    step = np.maximum(span / levels, np.abs(g).max(1) / levels)
    assert (err.max(1) <= 1.5 * step + 1e-30).all()


def test_kquant_zero_and_constant_blocks(backend):
    x = np.zeros((2, 512), np.float32)
    x[1, :256] = 0.25
    for qtype in KQUANTS:
        raw = Q.quantize(x, qtype, backend=backend)
        deq = gguf.quants.dequantize(raw, qtype)
        assert np.array_equal(deq[0], np.zeros(512, np.float32))
        np.testing.assert_allclose(deq[1], x[1], atol=2e-3)
    # Q6_K all-zero super-block is written as zero bytes, like ggml's memset
    assert not Q.quantize(np.zeros((1, 256), np.float32), QT.Q6_K, backend=backend).any()


@pytest.mark.parametrize("qtype", C_TYPES)
def test_non_finite_values_are_refused(qtype, backend):
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = _data("normal", (3, 512), seed=2)
        bad[2, 300] = bad_value
        with pytest.raises(Q.QuantizationError, match="non-finite"):
            Q.quantize(bad, qtype, backend=backend)
        with pytest.raises(Q.QuantizationError, match="non-finite"):
            Q.quantize(torch.from_numpy(bad).bfloat16(), qtype, backend=backend)


def test_can_quantize_and_errors():
    assert Q.can_quantize((4, 256), QT.Q4_K)
    assert not Q.can_quantize((4, 100), QT.Q4_K)
    assert not Q.can_quantize((4, 288), QT.Q6_K)
    assert Q.can_quantize((4, 288), QT.Q8_0)
    assert not Q.can_quantize((4, 48), QT.Q8_0)
    assert Q.can_quantize((4, 48), QT.F16) and Q.can_quantize((3,), QT.BF16)
    assert not Q.can_quantize((4, 256), QT.IQ2_XXS)  # not implemented
    with pytest.raises(Q.QuantizationError) as e:
        Q.quantize(np.zeros((4, 100), np.float32), QT.Q4_K)
    assert isinstance(e.value, gguf.QuantError)  # convert-style `except gguf.QuantError` catches it
    with pytest.raises(Q.QuantizationError):
        Q.quantize(np.zeros((4, 256), np.float32), QT.IQ2_XXS)
    bad = np.zeros((2, 32), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(Q.QuantizationError):
        Q.quantize(bad, QT.Q8_0)
    assert Q.quantized_shape((3, 512), QT.Q4_K) == (3, 288)
    assert Q.quantize(np.zeros((0, 64), np.float32), QT.Q8_0).shape == (0, 68)


def test_chunking_does_not_change_kquants():
    x = _data("heavy", (3, 768), seed=7)
    for qtype in KQUANTS:
        assert np.array_equal(Q.quantize(x, qtype), Q.quantize(x, qtype, chunk_elems=256))


# ------------------------------------------------------------------------------------------
# vs libggml (the quantizer llama.cpp itself runs), through llama-cpp-python's shared libs


def _libggml_base():
    llama_cpp = pytest.importorskip("llama_cpp")
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    cands = sorted(glob.glob(os.path.join(libdir, "libggml-base.so*")) + glob.glob(os.path.join(libdir, "libggml-base.dylib")))
    if not cands:
        pytest.skip(f"no libggml-base in {libdir}")
    lib = ctypes.CDLL(cands[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def _ggml_quantize(lib, x: np.ndarray, qtype) -> np.ndarray:
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows.shape[0], rows.shape[1] // block * size), np.uint8)
    n = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    assert n == out.size
    return out


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_blocks_identical_to_libggml(qtype, backend):
    lib = _libggml_base()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    total = same = 0
    worst = 0.0
    for i, kind in enumerate(KINDS):
        x = _data(kind, (8, 1024), seed=10 + i)
        ref = _ggml_quantize(lib, x, qtype)
        got = Q.quantize(x, qtype, backend=backend)
        assert got.shape == ref.shape
        rb, gb = ref.reshape(-1, size), got.reshape(-1, size)
        total += rb.shape[0]
        same += int((rb == gb).all(1).sum())
        worst = max(worst, float(np.abs(gguf.quants.dequantize(ref, qtype) - Q.dequantize(got, qtype)).max()))
    assert same == total, f"{qtype.name}: {same}/{total} blocks identical, max |deq diff| {worst}"


def _wide(shape, seed):
    """Rows whose scales span 1e-13 .. 1e4 (fp16 scales that underflow to subnormals and zero,
    6-bit sub-scales that round to 0, huge values), sparse rows, integer rows."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, shape) * np.exp(rng.uniform(-30, 9, (shape[0], 1)))).astype(np.float32)
    x[1::7] = np.where(rng.random((len(x[1::7]), shape[1])) < 0.9, 0, x[1::7])
    x[2::7] = rng.integers(-4, 5, (len(x[2::7]), shape[1]))
    x[3::7, ::16] *= 1e4  # one outlier per group
    return x


@pytest.mark.parametrize("qtype", C_TYPES)
def test_c_quantizers_on_more_data_and_dtypes(qtype):
    """The C quantizers against libggml on 4 M values of awkward data, from float32, bfloat16 and
    float16 inputs (read as they are, no float32 copy), split over threads in small chunks."""
    if not _c_available():
        pytest.skip("C quantizers unavailable")
    lib = _libggml_base()
    x = _wide((512, 8192), seed=21)
    ref = _ggml_quantize(lib, x, qtype)
    assert np.array_equal(Q.quantize(x, qtype, backend="c"), ref)
    rows = x[:64] / np.maximum(np.abs(x[:64]).max(1, keepdims=True), 1e-30) * 1000  # within float16's range
    for dt in (torch.bfloat16, torch.float16):
        xt = torch.from_numpy(rows).to(dt)
        want = _ggml_quantize(lib, xt.float().numpy(), qtype)
        assert np.array_equal(Q.quantize(xt, qtype, backend="c"), want), dt
        assert np.array_equal(Q.quantize(xt, qtype, backend="torch"), want), dt


def test_c_threads_and_chunks_do_not_change_the_bytes(monkeypatch):
    if not _c_available():
        pytest.skip("C quantizers unavailable")
    x = _data("heavy", (7, 2048), seed=8)
    monkeypatch.setattr(Q, "_C_CHUNK_BLOCKS", 3)
    for qtype in C_TYPES:
        one = Q.quantize(x, qtype, backend="c", threads=1)
        assert np.array_equal(Q.quantize(x, qtype, backend="c", threads=3), one)
        assert np.array_equal(Q.quantize(x, qtype, backend="torch"), one)


def test_c_portable_build_matches_libggml(tmp_path, monkeypatch):
    """The library built without -march=native (no AVX: the generic vector code of the scale
    searches) writes the same blocks."""
    from graphtune.export import _cquants

    if not _cquants._compilers():
        pytest.skip("no C compiler")
    monkeypatch.setenv("GRAPHTUNE_CACHE", str(tmp_path))
    path = _cquants._build(_cquants._compilers()[0], [])
    if path is None:
        pytest.skip("the portable build failed")
    plib = _cquants._load(path)
    assert _cquants._self_check(plib) is None
    lib = _libggml_base()
    x = _wide((64, 4096), seed=22)
    for qtype in C_TYPES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        out = np.empty(x.size // block * size, np.uint8)
        assert _cquants.quantize_blocks(plib, int(qtype), x.ctypes.data, 0, out.ctypes.data, 0, x.size // block) == -1
        assert np.array_equal(out.reshape(x.shape[0], -1), _ggml_quantize(lib, x, qtype)), qtype.name


def test_backend_selection(monkeypatch):
    from graphtune.export import _cquants

    monkeypatch.setenv("GRAPHTUNE_QUANT_BACKEND", "torch")
    assert Q.select_backend() == "torch"
    monkeypatch.setenv("GRAPHTUNE_QUANT_BACKEND", "fast")
    with pytest.raises(Q.QuantizationError, match="auto, c, torch"):
        Q.quantize(np.zeros((1, 32), np.float32), QT.Q8_0)
    monkeypatch.delenv("GRAPHTUNE_QUANT_BACKEND")
    monkeypatch.setitem(_cquants._state, "lib", None)
    monkeypatch.setitem(_cquants._state, "why", "no C compiler found")
    assert Q.select_backend() == "torch"  # auto falls back
    with pytest.raises(Q.QuantizationError, match="no C compiler found"):
        Q.quantize(np.zeros((1, 32), np.float32), QT.Q8_0, backend="c")


def test_self_check_rejects_a_library_that_disagrees():
    """A library whose bytes differ from the torch quantizers (e.g. built by a compiler that fuses
    into FMA) is never used."""
    from graphtune.export import _cquants

    class Wrong:
        @staticmethod
        def gt_quantize(qtype, src, src_type, dst, first, n):
            ctypes.memset(dst, 0, n * gguf.GGML_QUANT_SIZES[QT(qtype)][1])
            return -1

    assert _cquants._self_check(Wrong()) == "type 8"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16] + BLOCK_TYPES)
def test_cuda_matches_cpu(qtype):
    x = _data("heavy", (16, 1024), seed=11)
    x[0, :256] = 0.0
    cpu = Q.quantize(x, qtype)
    gpu = Q.quantize(torch.from_numpy(x).cuda(), qtype)
    assert gpu.dtype == cpu.dtype and np.array_equal(gpu, cpu)
    assert np.array_equal(Q.quantize(x, qtype, device="cuda"), cpu)
    if qtype not in (QT.F16,):
        assert np.array_equal(Q.dequantize(cpu, qtype, device="cuda"), Q.dequantize(cpu, qtype))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q6_K])
def test_quantize_into_a_given_buffer(qtype, backend):
    x = _data("heavy", (3, 512), seed=9)
    want = Q.quantize(x, qtype, backend=backend)
    buf = np.full(want.nbytes + 16, 0xAB, np.uint8)
    got = Q.quantize(torch.from_numpy(x), qtype, backend=backend, out=buf[8:-8])
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert np.shares_memory(got, buf) and (buf[:8] == 0xAB).all() and (buf[-8:] == 0xAB).all()
    assert buf[8:-8].tobytes() == want.tobytes()
    with pytest.raises(Q.QuantizationError, match="out="):
        Q.quantize(x, qtype, backend=backend, out=buf)
