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


@pytest.mark.parametrize("bits,symmetric,weight_range", [(8, True, "restricted"), (8, False, "restricted"),
                                                        (4, True, "restricted"), (4, True, "full"), (4, False, "full")])
@pytest.mark.parametrize("per_row", [False, True])
def test_own_range_scales_equal_the_fused_kernels_bit_for_bit(bits, symmetric, weight_range, per_row):
    """The scale of the tensor's own range (dynamic activations, weights): mostly nothing clips, so the
    no-clamp path runs ("full" clips each row's largest positive value: the clamping path). Values — sign
    of zero included — and gradients equal the fused kernels'."""
    qmin, qmax = int_range(bits, symmetric, weight_range)
    for seed in range(3):
        x = _inputs((48, 96), seed)
        x.view(-1)[1::11] = -1e-6  # rounds to -0.0 before the zero point is added
        lo, hi = torch.aminmax(x, dim=1, keepdim=True) if per_row else torch.aminmax(x)
        scale, zero = qparams(lo, hi, bits, symmetric, weight_range)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = _fake_rows(a, scale, zero, qmin, qmax)
        if per_row:
            ref = torch.fake_quantize_per_channel_affine(b, scale.reshape(-1), zero.reshape(-1).int(), 0, qmin, qmax)
        else:
            ref = torch.fake_quantize_per_tensor_affine(b, scale.reshape(()), zero.reshape(()).int(), qmin, qmax)
        assert torch.equal(ours, ref) and torch.equal(ours.signbit(), ref.signbit())
        g = torch.randn_like(x)
        ours.backward(g)
        ref.backward(g)
        assert torch.equal(a.grad, b.grad)


# ---- dynamic inputs shared by the layers one tensor feeds (fake_quant._dynamic_input) ----------------


def _dynamic_qat(model):
    from hf_compress import QATConfig
    from hf_compress.quantization import prepare

    prepare(model, QATConfig(weight_bits=8, activation_bits=8, observer="dynamic"))
    return model


def test_query_key_value_share_one_quantised_input_and_the_gradient_is_the_unshared_one(monkeypatch):
    import copy

    from hf_compress.quantization import fake_quant
    from helpers import tiny_bert

    model = _dynamic_qat(tiny_bert(layers=2, seed=0))
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    calls = []
    real = fake_quant.fake_quantize
    monkeypatch.setattr(fake_quant, "fake_quantize", lambda *a: calls.append(1) or real(*a))
    model.eval()  # no dropout: both passes see the same network
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    n_linear = len(fake_quant.fake_quant_layers(model))
    # per block query/key/value read one input: 2 of every 6 block Linears reuse it
    assert len(calls) == n_linear - 2 * 2, (len(calls), n_linear)

    # the same forward with the sharing off: identical loss, gradients equal up to the order of summation
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)

    def unshared(x, act):
        with torch.no_grad():
            scale, zero = qparams(*torch.aminmax(x.detach()), act.bits, act.symmetric)
        return real(x, scale, zero, act.qmin, act.qmax)

    monkeypatch.setattr(fake_quant, "_dynamic_input", unshared)
    out_ref = ref(input_ids=ids, labels=labels)
    out_ref.loss.backward()
    assert torch.equal(out.logits, out_ref.logits)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(shared[n], p.grad, rtol=1e-5, atol=1e-7)


def test_shared_input_is_recomputed_when_the_tensor_changes_or_the_grad_mode_does():
    from hf_compress.quantization.fake_quant import _dynamic_input
    from hf_compress.quantization.plan import ActScheme

    act = ActScheme(bits=8, symmetric=False, observer="dynamic")
    x = torch.randn(3, 8)
    first = _dynamic_input(x, act)
    assert _dynamic_input(x, act) is first  # the same tensor, unchanged: reused
    assert _dynamic_input(x.clone(), act) is not first  # an equal but other tensor: its own
    x.mul_(10.0)  # changed in place: recomputed on the new values
    again = _dynamic_input(x, act)
    assert again is not first and torch.equal(again, _dynamic_input(x.clone(), act))
    with torch.no_grad():
        frozen = _dynamic_input(x, act)
    assert frozen is not again and frozen.grad_fn is None
    y = torch.randn(3, 8, requires_grad=True)
    assert _dynamic_input(y, act).grad_fn is not None
    # nothing is kept alive: once the caller drops the result, it is gone
    import gc

    from hf_compress.quantization import fake_quant

    out = _dynamic_input(torch.randn(3, 8), act)
    ref = fake_quant._LAST.entry[2]
    del out
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_inputs_under_gradient_checkpointing(reentrant):
    """Recomputed blocks quantise their inputs again (never a result of the first forward): the gradients
    equal those without checkpointing."""
    import copy

    from helpers import tiny_bert

    model = _dynamic_qat(tiny_bert(layers=2, seed=0)).eval()
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0])
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt.train()
    for m in ckpt.modules():  # training mode for checkpointing, but no dropout: both see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    calls = []
    ckpt.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *a: calls.append(1))
    model(input_ids=ids, labels=labels).loss.backward()
    ckpt(input_ids=ids, labels=labels).loss.backward()
    assert len(calls) == 2  # the block ran again in backward: checkpointing is on
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
