"""Primitives, exactly, against an independent NumPy reference written from the definitions."""
import numpy as np
import pytest
import torch

from zquant import primitives as P
from zquant.config import WeightQuant


def np_weight_quant(w, bits, granularity, groups=None, group_size=128):
    """Loop-based reference: returns (int array [N,K], per-element scale [N,K])."""
    w = np.asarray(w, dtype=np.float64)
    n, k = w.shape
    qm = 2 ** (bits - 1) - 1
    scale = np.zeros_like(w)
    if granularity == "row":
        blocks = [(slice(i, i + 1), slice(0, k)) for i in range(n)]
    elif granularity == "row_group":
        r = -(-n // min(groups, n))
        blocks = [(slice(i, min(i + r, n)), slice(0, k)) for i in range(0, n, r)]
    else:
        blocks = [(slice(i, i + 1), slice(j, min(j + group_size, k))) for i in range(n) for j in range(0, k, group_size)]
    for rows, cols in blocks:
        m = np.abs(w[rows, cols]).max()
        scale[rows, cols] = np.float32(np.float32(m) / np.float32(qm)) if m > 0 else 1.0
    q = np.clip(np.rint(w.astype(np.float32) / scale.astype(np.float32)), -qm, qm)
    return q.astype(np.int8), scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity,groups,group_size", [
    ("row", None, 128), ("row_group", 4, 128), ("row_group", 5, 128), ("row_group", 64, 128),
    ("input_group", None, 16), ("input_group", None, 7)])
def test_weight_quantization_matches_reference(bits, granularity, groups, group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 40) * torch.linspace(0.1, 3, 24)[:, None]     # rows with very different ranges
    w[3] = 0.0                                                         # an all-zero row
    spec = WeightQuant(bits, granularity, groups, group_size)
    s = P.weight_scales(w, spec)
    q = P.quantize_weight(w, s, spec)
    q_ref, scale_ref = np_weight_quant(w.numpy(), bits, granularity, groups, group_size)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    full = P.expand_weight_scales(s, tuple(w.shape), spec).expand_as(w)
    np.testing.assert_array_equal(full.numpy(), scale_ref.astype(np.float32))
    # Dequantization error is at most half a step everywhere.
    err = (P.dequantize_weight(q, s, spec) - w).abs()
    assert torch.all(err <= full / 2 + 1e-6)


def test_row_group_shapes_follow_zeroquant():
    w = torch.randn(1536, 8)
    assert P.weight_scales(w, WeightQuant(8, "row_group", 64)).shape == (64,)       # 24 rows per group
    assert P.rows_per_group(1536, 64) == 24
    assert P.weight_scales(torch.randn(192, 8), WeightQuant(8, "row_group", 64)).shape == (64,)
    assert P.weight_scales(torch.randn(10, 8), WeightQuant(8, "row_group", 64)).shape == (10,)   # capped at one row per group


def np_per_token(x, symmetric):
    x = np.asarray(x, dtype=np.float32)
    q = np.zeros(x.shape, np.int8)
    scales, zeros = [], []
    for i, row in enumerate(x):
        if symmetric:
            m = np.abs(row).max()
            s = np.float32(m / np.float32(127)) if m > 0 else np.float32(1)
            q[i] = np.clip(np.rint(row / s), -127, 127)
            scales.append(s)
        else:
            lo, hi = min(row.min(), 0), max(row.max(), 0)
            s = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255)) if hi > lo else np.float32(1)
            z = np.clip(-128 - np.rint(np.float32(lo) / s), -128, 127)
            q[i] = np.clip(np.rint(row / s) + z, -128, 127)
            scales.append(s)
            zeros.append(z)
    return q, np.array(scales, np.float32), np.array(zeros, np.int32) if zeros else None


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_quantization_matches_reference(symmetric):
    torch.manual_seed(1)
    x = torch.randn(9, 33) * torch.logspace(-2, 2, 9)[:, None]
    x[2] = 0.0
    x[5] = x[5].abs() + 0.5            # all-positive token: asymmetric uses the full range
    q, s, z = P.quantize_per_token(x, symmetric)
    q_ref, s_ref, z_ref = np_per_token(x.numpy(), symmetric)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    if symmetric:
        assert z is None
    else:
        np.testing.assert_array_equal(z.numpy(), z_ref)
        deq = (q.float() - z[:, None]) * s[:, None]
        assert torch.all((deq - x).abs() <= s[:, None] / 2 + 1e-6)


def test_per_tensor_static():
    x = torch.tensor([[0.5, -1.0, 3.0], [10.0, -10.0, 0.0]])
    s = P.static_scale(torch.tensor(2.54))
    assert s.item() == pytest.approx(0.02)
    q = P.quantize_per_tensor(x, s)
    assert q.tolist() == [[25, -50, 127], [127, -127, 0]]   # outliers saturate


@pytest.mark.parametrize("k", [1, 2, 7, 64, 65])
def test_int4_pack_roundtrip(k):
    q = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    p = P.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, (k + 1) // 2)
    assert torch.equal(P.unpack_int4(p, k), q)


def test_int4_pack_layout():
    q = torch.tensor([[1, -1, 7, -8]], dtype=torch.int8)
    assert P.pack_int4(q).tolist() == [[0xF1, 0x87]]      # low nibble = even column


def test_int4_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        P.pack_int4(torch.tensor([[9]], dtype=torch.int8))
    with pytest.raises(TypeError):
        P.pack_int4(torch.tensor([[1]], dtype=torch.int32))


def test_fake_quant_is_straight_through():
    w = torch.randn(8, 16, requires_grad=True)
    out = P.fake_quantize_weight(w, WeightQuant(4, "row_group", 2))
    assert not torch.equal(out, w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = P.fake_quantize_per_token(x)
    q, s, _ = P.quantize_per_token(x.detach().reshape(-1, 16))
    assert torch.allclose(y.detach().reshape(-1, 16), q.float() * s[:, None])
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
