"""The CPU fake-quantisation path (numerics._FakeRowsCPU) against PyTorch's fused kernels: bit-identical values
and straight-through gradients, per tensor and per row, symmetric and asymmetric, 8 and 4 bits, ties included."""

import pytest
import torch

from hf_compress.quantization.numerics import _fake_rows, int_range, qparams


def _inputs(shape, seed, step=0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    x.view(-1)[::7] = (torch.round(x.view(-1)[::7] / step) + 0.5) * step  # exact ties of a power-of-two scale
    return x


@pytest.mark.parametrize("bits,symmetric,weight_range", [(8, True, "restricted"), (8, False, "restricted"),
                                                        (4, True, "restricted"), (4, True, "full"), (4, False, "full")])
@pytest.mark.parametrize("per_row", [False, True])
def test_cpu_path_equals_the_fused_kernels(bits, symmetric, weight_range, per_row):
    step = 2.0 ** (-5 if bits == 8 else -2)  # per tensor: a grid of range about ±4 (8 bits) / ±2 (4 bits) clips
    for seed in range(3):
        x = _inputs((48, 96), seed, step)
        qmin, qmax = int_range(bits, symmetric, weight_range)
        if per_row:
            lo, hi = torch.aminmax(x, dim=1, keepdim=True)
        else:
            lo, hi = torch.aminmax(x)
            lo, hi = lo * 0.8, hi * 0.8  # clip some values: the gradient mask matters
        if per_row:
            lo, hi = lo * 0.9, hi * 0.9
        scale, zero = qparams(lo, hi, bits, symmetric, weight_range)
        if not per_row:  # a power-of-two scale puts the values made by _inputs exactly on ties
            scale = torch.full_like(scale, step)
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        ours = _fake_rows(a, scale, zero, qmin, qmax)
        if per_row:
            ref = torch.fake_quantize_per_channel_affine(b, scale.reshape(-1), zero.reshape(-1).int(), 0, qmin, qmax)
        else:
            ref = torch.fake_quantize_per_tensor_affine(b, scale.reshape(()), zero.reshape(()).int(), qmin, qmax)
        assert torch.equal(ours, ref)
        g = torch.randn_like(x)
        ours.backward(g)
        ref.backward(g)
        assert torch.equal(a.grad, b.grad)
        assert (a.grad == 0).any() and (a.grad != 0).any()  # both sides of the clipping were exercised


def test_three_dimensional_activations_and_no_grad():
    x = _inputs((4, 10, 32), 5)
    scale, zero = qparams(*torch.aminmax(x), 8, False)
    ref = torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero.reshape(()).int(), -128, 127)
    with torch.no_grad():
        assert torch.equal(_fake_rows(x, scale, zero, -128, 127), ref)
    assert torch.equal(_fake_rows(x, scale, zero, -128, 127), ref)


def test_non_finite_inputs_stay_visible_or_clip():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.3]], requires_grad=True)
    out = _fake_rows(x, torch.tensor(0.1), torch.tensor(0.0), -127, 127)
    assert torch.isnan(out[0, 0])  # a NaN stays NaN, so the finite checks see it
    assert out[0, 1].item() == pytest.approx(12.7) and out[0, 2].item() == pytest.approx(-12.7)
    out.sum().backward()
    assert x.grad.tolist() == [[0.0, 0.0, 0.0, 1.0]]
