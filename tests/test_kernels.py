"""The fast paths against their references: bitsandbytes' own dequantization and matmul."""

from __future__ import annotations

import pytest
import torch

from qlora.adapters import AdapterConfig, attach_adapters
from qlora.kernels.dequant import dequantize_4bit, packed_from_bnb
from qlora.kernels.matmul_4bit import matmul_4bit
from qlora.models import load_model
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed


@pytest.mark.parametrize("shape", [(6, 128), (96, 200), (1000, 33)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_bitsandbytes(shape, quant_type, double_quant, dtype):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(hash((shape, quant_type)) % 2**31)
    weight = torch.randn(*shape, generator=g).to(dtype)
    param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=64,
                              compress_statistics=double_quant, quant_type=quant_type).to("cpu")
    expected = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    got = dequantize_4bit(packed_from_bnb(param))
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_matmul_4bit_forward_and_input_gradient_equal_bitsandbytes():
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)
    param = bnb.nn.Params4bit(torch.randn(48, 64, generator=g), requires_grad=False,
                              blocksize=64, compress_statistics=True, quant_type="nf4").to("cpu")
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    bias = torch.randn(48, generator=g)
    ref = bnb.matmul_4bit(x, param.t(), bias=bias, quant_state=param.quant_state)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    ref_grad = x.grad.clone()
    x.grad = None
    out = matmul_4bit(x, packed_from_bnb(param), bias)
    out.backward(dy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_fast_path_model_equals_reference_path(llama_dir):
    model = load_model(llama_dir, QuantConfig(method="nf4", compute_dtype=torch.float32))
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(6, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    model.train()
    runs = []
    for fast in (False, True):
        assert apply_speed(model, SpeedPlan(fast_base=fast, grouped=fast)).fast_layers == (
            14 if fast else 0)
        model.zero_grad()
        loss = model(ids, labels=ids)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not any("fast_base" in k for k in model.state_dict())
