"""The CPU fast path (`zquant.kernels.cpu`) against the reference path, on random inputs.

These tests need the C++ extension: the first test to use it builds it (~25 s on 2 cores, once
per machine; it is cached under $ZQUANT_CACHE). On a CPU without AVX-512 VNNI they are skipped
with the reason; a build failure on a capable CPU fails them.

Tolerance: none. A quantized linear runs the same integer arithmetic as the reference and the
same float operations in the same order; the fused RMSNorm sums in the order of torch's own
reduction and the fused SiLU uses the same exp (Sleef) and the same scalar tails as torch's
kernel; LayerNorm and the other activations are torch's own ops run inside the fused op. So every
result here must be *bit-identical* (``torch.equal``) to what the reference path computes: INT8
rounding would turn a 1-ulp difference into a visible one (see docs/benchmarks.md).
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from zquant import kernels
from zquant import primitives as P
from zquant.config import ActQuant, LayerQuant, WeightQuant
from zquant.kernels import build, cpu, reference
from zquant.modules import QuantLinear

SYM, ASYM, STATIC = ActQuant(), ActQuant(symmetric=False), ActQuant(mode="static")


pytestmark = pytest.mark.usefixtures("cpu_extension")


def make_layer(k: int, n: int, bits: int = 8, act: ActQuant = SYM, granularity: str = "row_group",
               groups: int = 7, bias: bool = True, dtype=torch.float32, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias).to(dtype)
    spec = LayerQuant(WeightQuant(bits=bits, granularity=granularity, groups=groups), act)
    return QuantLinear.from_float(lin, spec, act_absmax=torch.tensor(2.5))


def inputs(m: int, k: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    if m > 2:
        x[1] = 0                      # an all-zero token: scale 1, all q = 0
        x[2] *= 1e4                   # a token far larger than the others
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 16, 17, 576, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [SYM, ASYM], ids=["sym", "asym"])
def test_quantize_equals_primitives(k, dtype, act):
    x = inputs(37, k, dtype)
    q, scale, zero = P.quantize_per_token(x, act.symmetric)
    q2, scale2, zero2 = cpu.quantize(x, act).as_reference(k)
    assert torch.equal(q, q2) and torch.equal(scale, scale2)       # exact, not within 1 LSB
    assert (zero is None) == (zero2 is None) and (zero is None or torch.equal(zero, zero2))


def test_quantize_rounds_ties_like_torch_round():
    # Quotients at (and one float step around) k + 0.5: round-half-even must agree everywhere,
    # although the kernel multiplies by 1/scale and divides only near ties.
    scale = torch.rand(64, 1) + 0.1
    halves = torch.randint(-254, 255, (64, 300)).float() / 2
    x = halves * scale
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)], dim=1)
    x[:, 0] = 127 * scale[:, 0]                                      # pin the absmax, hence the scale
    for act in (SYM, ASYM):
        q, s, z = P.quantize_per_token(x, act.symmetric)
        q2, s2, z2 = cpu.quantize(x, act).as_reference(x.shape[1])
        assert torch.equal(q, q2) and torch.equal(s, s2)


# ---------------------------------------------------------------------------------------------
# Linear layers: every path of the GEMM driver
# ---------------------------------------------------------------------------------------------

# (M, K, N): 1 token, decode sizes, odd K and N (K and N tails), a single tile of columns
# (split over rows), more rows than one L2 block (K = 4096 -> 60-row blocks), SmolLM2 sizes.
SHAPES = [(1, 576, 576), (1, 33, 17), (3, 5, 1), (7, 1, 40), (16, 576, 1536), (5, 1536, 576),
          (64, 48, 16), (130, 4096, 40), (129, 100, 300), (200, 96, 1000), (2, 4096, 4096)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_linear_bit_identical(m, k, n, bits):
    for act in (SYM, ASYM, STATIC):
        layer = make_layer(k, n, bits, act)
        x = inputs(m, k)
        assert torch.equal(cpu.linear(layer, x), reference.linear(layer, x)), act


@pytest.mark.parametrize("granularity,groups", [("row", None), ("row_group", 1), ("row_group", 64)])
def test_linear_granularities_and_no_bias(granularity, groups):
    layer = make_layer(200, 150, 8, SYM, granularity, groups or 1, bias=False)
    x = inputs(9, 200)
    assert torch.equal(cpu.linear(layer, x), reference.linear(layer, x))


@pytest.mark.parametrize("bits", [8, 4])
def test_linear_bfloat16(bits):
    # bf16 activations are widened exactly and the output is rounded to nearest-even, as .to() does.
    layer = make_layer(300, 70, bits, SYM, dtype=torch.bfloat16)
    x = inputs(21, 300, torch.bfloat16)
    y = cpu.linear(layer, x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, reference.linear(layer, x))


def test_linear_batched_shapes_and_non_contiguous():
    layer = make_layer(64, 48)
    x = torch.randn(3, 40, 64)[:, ::2]                      # [3, 20, 64], not contiguous
    y = cpu.linear(layer, x)
    assert y.shape == (3, 20, 48) and torch.equal(y, reference.linear(layer, x))
    empty = torch.randn(0, 64)
    assert cpu.linear(layer, empty).shape == (0, 48)


def test_thread_counts_give_identical_results():
    layer = make_layer(576, 1536)
    x = inputs(100, 576)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.linear(layer, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, cpu.linear(layer, x))


def test_prepacked_weight_follows_weight_changes():
    layer = make_layer(64, 32)
    x = inputs(4, 64)
    cpu.linear(layer, x)
    assert "cpu" in layer.kernel_cache
    layer.set_weight(torch.randn(32, 64))                    # clears the cache
    assert torch.equal(cpu.linear(layer, x), reference.linear(layer, x))


def test_dispatch_picks_cpu_and_reference_can_be_forced():
    layer = make_layer(64, 32)
    x = inputs(4, 64)
    assert kernels.select(layer, x).name == "cpu"
    with kernels.use_backend("reference"):
        assert kernels.select(layer, x).name == "reference"
    a16 = make_layer(64, 32, act=ActQuant(mode="none"))
    assert kernels.select(a16, x).name == "reference"          # weight-only layers: not this kernel
    gptq = make_layer(64, 32, granularity="input_group")
    assert kernels.select(gptq, x).name == "reference"


# ---------------------------------------------------------------------------------------------
# Fused epilogues and producers
# ---------------------------------------------------------------------------------------------

ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_act_epilogue(act, dtype):
    for bits in (8, 4):
        layer = make_layer(96, 200, bits, dtype=dtype)
        x = inputs(13, 96, dtype)
        y = cpu.linear_act(layer, x, act, SYM)
        assert torch.equal(y, ACTS[act](reference.linear(layer, x)))
        qa = getattr(y, cpu.ATTR)           # quantized for the next layer from the values it returns
        q, s, _ = P.quantize_per_token(y)
        assert torch.equal(qa.as_reference(200)[0], q) and torch.equal(qa.scale, s)


# (M, N): with M * N = 112 torch's silu runs 3 vector iterations of 32 and a 16-element scalar
# tail (whose exp differs from Sleef's on ~0.4% of inputs); 2048 x 1536 splits over threads.
@pytest.mark.parametrize("m,n", [(7, 16), (1, 40), (22, 40), (300, 1000), (2048, 1536)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gated_epilogue(m, n, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            gate, up = make_layer(64, n, 8, seed=1, dtype=dtype), make_layer(64, n, 8, seed=2, dtype=dtype)
            x = inputs(m, 64, dtype) * 3
            y = cpu.gated(gate, up, x, "silu", ASYM)
            assert torch.equal(y, F.silu(reference.linear(gate, x)) * reference.linear(up, x)), dtype
            q, s, z = P.quantize_per_token(y, symmetric=False)
            q2, s2, z2 = getattr(y, cpu.ATTR).as_reference(n)
            assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(z, z2)
    finally:
        torch.set_num_threads(before)


def test_gated_int4():
    gate, up = make_layer(100, 48, 4, seed=1), make_layer(100, 48, 4, seed=2)
    x = inputs(9, 100)
    assert torch.equal(cpu.gated(gate, up, x, "silu"), F.silu(reference.linear(gate, x)) * reference.linear(up, x))


@pytest.mark.parametrize("k", [1, 5, 7, 8, 15, 64, 577, 1536, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_quant(k, dtype):
    x = inputs(9, k, dtype)   # includes an all-zero row and a huge one
    w, b = torch.randn(k).to(dtype), torch.randn(k).to(dtype)
    y = cpu.norm(x, w, None, 1e-5, "rms", SYM)
    h = x.to(torch.float32)                                                    # LlamaRMSNorm.forward
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(y, w * h.to(dtype))
    q, s, _ = P.quantize_per_token(y)
    assert torch.equal(getattr(y, cpu.ATTR).as_reference(k)[0], q)
    y = cpu.norm(x, w, b, 1e-5, "layer", SYM)
    assert torch.equal(y, F.layer_norm(x, (k,), w, b, 1e-5))


def test_attached_quantization_is_used_only_when_valid():
    layer = make_layer(64, 32)
    x = inputs(6, 64)
    y = cpu.norm(x, torch.ones(64), None, 1e-6, "rms", SYM)
    before = dict(cpu.stats)
    assert torch.equal(cpu.linear(layer, y), reference.linear(layer, y))
    assert cpu.stats["reused"] == before["reused"] + 1
    y.mul_(3)                                     # modified in place: the attachment is stale
    assert torch.equal(cpu.linear(layer, y), reference.linear(layer, y))
    assert cpu.stats["quantized"] == before["quantized"] + 1
    asym = make_layer(64, 32, act=ASYM)
    z = cpu.norm(x, torch.ones(64), None, 1e-6, "rms", SYM)
    assert torch.equal(cpu.linear(asym, z), reference.linear(asym, z))   # asks for another quantization


def test_attached_asymmetric_quantization_is_used():
    layer = make_layer(300, 40, act=ASYM)
    x = inputs(9, 300)
    qa = cpu.quantize(x, ASYM)
    assert len(set(qa.offset.tolist())) > 1                  # a zero point (offset) per row
    setattr(x, cpu.ATTR, dataclasses.replace(qa, version=x._version))
    before = cpu.stats["reused"]
    assert torch.equal(cpu.linear(layer, x), reference.linear(layer, x))
    assert cpu.stats["reused"] == before + 1


def test_kernels_are_named_in_torch_profiler():
    layer = make_layer(64, 32)
    x = inputs(6, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = cpu.norm(x, torch.ones(64), None, 1e-6, "rms", SYM)
        out = cpu.linear(layer, y)
    names = {e.key for e in prof.key_averages()}
    assert {"zquant::norm_quant", "zquant::linear"} <= names
    assert torch.equal(out, reference.linear(layer, y))


def test_concurrent_calls_from_python_threads():
    # The kernels release the GIL: calls from several Python threads overlap, each with its own
    # scratch buffers and OpenMP team, and every result is still the reference's.
    from concurrent.futures import ThreadPoolExecutor

    layers = [make_layer(96, 80, seed=s) for s in range(3)] + [make_layer(96, 80, bits=4, seed=3)]
    xs = [inputs(m, 96, seed=m) for m in (1, 7, 64, 200)]
    jobs = [(layer, x) for layer in layers for x in xs] * 4

    def run(job):
        layer, x = job
        return cpu.linear(layer, x)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs))
    for (layer, x), y in zip(jobs, results):
        assert torch.equal(y, reference.linear(layer, x))


# ---------------------------------------------------------------------------------------------
# Fallback
# ---------------------------------------------------------------------------------------------

def test_fallback_warns_once_with_the_reason(monkeypatch):
    backend = kernels.backend("cpu")
    monkeypatch.setattr(backend, "available", lambda: "simulated: no extension")
    monkeypatch.setattr(kernels, "_warned", set())
    layer = make_layer(64, 32)
    x = inputs(4, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [layer(x) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated: no extension" in messages[0] and "reference" in messages[0]
    assert all(torch.equal(y, reference.linear(layer, x)) for y in ys)


def test_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("compilation failed\nzquant_cpu.cpp:1: error: simulated")

    monkeypatch.setenv("ZQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "unsupported_reason", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    reason = build.load()
    assert reason is not None and "error: simulated" in reason


def test_corrupt_cached_library_is_rebuilt(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    rebuilt = object()
    calls = []

    def fake_build(*args, **kwargs):
        calls.append(kwargs)
        return rebuilt

    monkeypatch.setenv("ZQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_modules", {})
    monkeypatch.setattr(build, "unsupported_reason", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", fake_build)
    library = build.build_dir() / f"{build.NAME}.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not an ELF file: half-written by an interrupted build")
    assert build.load() is None
    assert build.extension() is rebuilt and len(calls) == 1 and calls[0]["is_python_module"]
    assert not library.exists()        # the corrupt file was removed before the rebuild


def test_cpu_without_vnni_is_reported(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: {"avx2", "fma"})
    reason = build.unsupported_reason()
    assert reason is not None and "avx512_vnni" in reason
