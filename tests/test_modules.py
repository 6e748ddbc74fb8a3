"""QuantLinear: real storage, the integer pipeline, SNR floors, GPT-2 Conv1D."""
import pytest
import torch
from torch import nn

from conftest import snr_db
from zquant import kernels, primitives as P
from zquant.config import ActQuant, LayerQuant, WeightQuant
from zquant.modules import QuantLinear


def linear(k=96, n=80, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 2.0, n)[:, None])   # row ranges differ ~10x, as in the paper
    return lin


SPECS = {
    "w8 row_group dyn": LayerQuant(WeightQuant(8, "row_group", 8), ActQuant("dynamic")),
    "w8 row dyn asym": LayerQuant(WeightQuant(8, "row"), ActQuant("dynamic", symmetric=False)),
    "w4 row_group dyn": LayerQuant(WeightQuant(4, "row_group", 8), ActQuant("dynamic")),
    "w8 input_group dyn": LayerQuant(WeightQuant(8, "input_group", group_size=32), ActQuant("dynamic")),
    "w4 input_group a16": LayerQuant(WeightQuant(4, "input_group", group_size=32), ActQuant("none")),
    "w8 row_group a16": LayerQuant(WeightQuant(8, "row_group", 8), ActQuant("none")),
    "w8 static": LayerQuant(WeightQuant(8, "row_group", 8), ActQuant("static")),
}
SNR_FLOOR = {8: 30.0, 4: 14.0}   # dB on Gaussian inputs: INT8 ~38-45 dB, INT4 ~18-22 dB


@pytest.mark.parametrize("name", SPECS)
def test_quantlinear_snr_floor(name):
    spec = SPECS[name]
    lin = linear()
    x = torch.randn(3, 17, 96)
    absmax = x.abs().amax() if spec.act.mode == "static" else None
    q = QuantLinear.from_float(lin, spec, absmax)
    with kernels.use_backend("reference"):
        y = q(x)
    assert y.shape == (3, 17, 80) and y.dtype == x.dtype
    assert snr_db(lin(x), y) > SNR_FLOOR[spec.weight.bits]


def test_integer_pipeline_is_exact():
    """y = (int8 x) . (int8 W) in exact integer arithmetic, times token scale, times row scale, + bias."""
    lin = linear()
    spec = SPECS["w8 row_group dyn"]
    q = QuantLinear.from_float(lin, spec)
    x = torch.randn(5, 96)
    with kernels.use_backend("reference"):
        y = q(x).double()
    xq, sx, _ = P.quantize_per_token(x)
    acc = xq.double() @ q.int_weight().double().t()                  # exact: |acc| < 2^53
    expected = acc * sx.double()[:, None] * q.row_scale().double()[None, :] + lin.bias.double()
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)     # float32 epilogue rounding only


def test_int4_is_packed_and_size_is_real():
    lin = linear(k=96, n=80, bias=False)
    q8 = QuantLinear.from_float(lin, SPECS["w8 row_group dyn"])
    q4 = QuantLinear.from_float(lin, SPECS["w4 row_group dyn"])
    assert q8.qweight.dtype == torch.int8 and q8.qweight.shape == (80, 96)
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.shape == (80, 48)
    assert q4.int_weight().abs().max() <= 7
    assert q8.wscale.shape == (8,)


def test_from_float_does_not_mutate_source():
    lin = linear()
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    QuantLinear.from_float(lin, SPECS["w4 row_group dyn"])
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])


def test_conv1d_is_transposed():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(80, 96)                           # nf=80 outputs, nx=96 inputs; weight [96, 80]
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    q = QuantLinear.from_float(conv, SPECS["w8 row_group dyn"])
    x = torch.randn(4, 96)
    assert q.out_features == 80 and q.in_features == 96
    assert snr_db(conv(x), q(x)) > SNR_FLOOR[8]


def test_static_needs_calibration_and_rejects_float_spec():
    with pytest.raises(ValueError, match="act_absmax"):
        QuantLinear.from_float(linear(), SPECS["w8 static"])
    with pytest.raises(ValueError, match="weight spec"):
        QuantLinear(4, 4, LayerQuant(weight=None))
    with pytest.raises(TypeError, match="Embedding"):
        QuantLinear.from_float(nn.Embedding(4, 4), SPECS["w8 row_group dyn"])


def test_zero_input_rows_give_bias():
    q = QuantLinear.from_float(linear(), SPECS["w8 row_group dyn"])
    with kernels.use_backend("reference"):
        y = q(torch.zeros(2, 96))
    torch.testing.assert_close(y, q.bias.expand(2, -1))


def test_dispatch_forcing_and_unknown_backend():
    q = QuantLinear.from_float(linear(), SPECS["w8 row_group dyn"])
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with kernels.use_backend("nope"):
            pass
    with kernels.use_backend("reference"):
        assert kernels.select(q, torch.randn(1, 96)).name == "reference"
