"""Observers and scales against direct computations (issue 13): exact percentiles on the whole tensor,
PTQ calibration over every calibration batch, a minimum scale for near-zero ranges."""

import numpy as np
import pytest
import torch

from hf_compress import QATConfig, quantize_model
from hf_compress.quantization import Observer, build_plan, fake_quantize, fake_quantize_weight, insert_fake_quant, qparams
from hf_compress.quantization.numerics import MIN_SCALE, QScheme
from hf_compress.quantization.observers import MAX_SAMPLES, quantiles
from helpers import TokenDataset, tiny_bert


def direct(x: torch.Tensor, qs) -> torch.Tensor:
    """torch.quantile on the whole tensor, in float64 (q exactly as given)."""
    return torch.quantile(x.double().reshape(-1), torch.tensor(qs, dtype=torch.float64)).float()


def test_percentile_sees_an_outlier_channel_a_stride_misses():
    torch.manual_seed(0)
    x = torch.randn(8, 128, 1024)  # 2^20 values: a stride of 16 only ever reads channels 0, 16, 32, 48, ...
    x[..., 40] = 50 + torch.rand(8, 128)  # 1024 outliers: 0.1% of the values, all in channel 40
    assert x.reshape(-1)[:: -(-x.numel() // MAX_SAMPLES)].max() < 10  # what a strided sample would see
    obs = Observer("percentile", percentile=99.99)
    obs(x)
    obs.commit()
    want = direct(x, [1e-4, 1 - 1e-4])
    assert want[1] > 50  # the outliers set the 99.99th percentile
    torch.testing.assert_close(torch.stack([obs.lo, obs.hi]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, MAX_SAMPLES + 1, 300_000])
@pytest.mark.parametrize("qs", [(1e-4, 1 - 1e-4), (0.001, 0.999), (0.1, 0.9), (0.4, 0.6), (0.0, 1.0)])
def test_quantiles_equal_torch_quantile(n, qs):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) ** 3  # heavy tails
    torch.testing.assert_close(quantiles(x, qs), direct(x, list(qs)), rtol=1e-6, atol=1e-6)
    ties = torch.randint(-5, 6, (n,), generator=g).float()  # many equal values around the threshold
    torch.testing.assert_close(quantiles(ties, qs), direct(ties, list(qs)), rtol=0, atol=1e-6)


def test_quantiles_exact_when_the_sample_misleads_the_threshold():
    # outliers exactly on the sampled positions: the sample overstates the tail, the check falls back
    n = 1 << 20
    x = torch.randn(n)
    stride = -(-n // MAX_SAMPLES)
    x[::stride] = 100 + torch.rand(x[::stride].shape)
    for qs in [(1e-4, 1 - 1e-4), (0.01, 0.99)]:
        torch.testing.assert_close(quantiles(x, qs), direct(x, list(qs)), rtol=1e-6, atol=1e-6)


def _calibration_batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, 8, generator=g) * (1 + 2 * i) for i in range(n)]  # ranges grow batch by batch


@pytest.mark.parametrize("kind", ["moving_average", "percentile", "minmax"])
def test_calibrating_observer_averages_every_batch_equally(kind):
    batches = _calibration_batches()
    obs = Observer(kind, averaging=0.01, percentile=99.0)
    obs.calibrating = True
    for b in batches:
        obs(b)
        obs.commit()
    if kind == "moving_average":
        want = torch.stack([torch.stack([b.min(), b.max()]) for b in batches]).mean(0)
    elif kind == "percentile":
        want = torch.stack([direct(b, [0.01, 0.99]) for b in batches]).mean(0)
    else:
        want = torch.stack([torch.cat(batches).min(), torch.cat(batches).max()])
    torch.testing.assert_close(torch.stack([obs.lo, obs.hi]), want, rtol=1e-6, atol=1e-6)
    # training (not calibrating) keeps the exponential average with weight `averaging`
    if kind == "moving_average":
        ema = Observer(kind, averaging=0.01)
        for b in batches:
            ema(b)
            ema.commit()
        hi = batches[0].max()
        for b in batches[1:]:
            hi = hi + 0.01 * (b.max() - hi)
        torch.testing.assert_close(ema.hi, hi)


@pytest.mark.parametrize("observer", ["moving_average", "percentile"])
def test_static_ptq_range_is_the_mean_over_all_calibration_batches(observer):
    loader = torch.utils.data.DataLoader(TokenDataset(48, seed=7), batch_size=6)  # 8 batches
    # direct computation: the layer's input on a copy with the same quantised weights, batch by batch
    ref = tiny_bert()
    insert_fake_quant(ref, build_plan(ref, {}))
    seen = []
    ref.bert.encoder.layer[1].output.dense.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    ref.eval()
    with torch.no_grad():
        for b in loader:
            ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    if observer == "moving_average":
        per_batch = torch.stack([torch.stack([s.min(), s.max()]) for s in seen])
    else:
        per_batch = torch.stack([direct(s, [1e-4, 1 - 1e-4]) for s in seen])
    want = per_batch.mean(0)
    assert not torch.allclose(per_batch[0], want, rtol=1e-3)  # the first batch alone is not the answer
    model = tiny_bert()
    quantize_model(model, QATConfig(activation_bits=8, observer=observer, averaging=0.01), loader, num_batches=8)
    obs = model.bert.encoder.layer[1].output.dense.input_observer
    torch.testing.assert_close(torch.stack([obs.lo, obs.hi]), want, rtol=1e-5, atol=1e-6)
    assert not obs.calibrating and not obs.observing


@pytest.mark.parametrize("symmetric", [True, False])
def test_tiny_range_gets_the_minimum_scale_and_finite_values(symmetric):
    assert MIN_SCALE == torch.finfo(torch.float32).eps
    lo, hi = torch.tensor(-3e-42), torch.tensor(2e-42)  # subnormal: 1 / (range / 255) overflows float32
    scale, zero = qparams(lo, hi, 8, symmetric)
    assert scale == MIN_SCALE and torch.isfinite(torch.reciprocal(scale))
    x = torch.tensor([0.0, 2e-42, -3e-42, 1e-3, -1e-3])
    qmin, qmax = (-127, 127) if symmetric else (-128, 127)
    y = fake_quantize(x, scale, zero, qmin, qmax)
    assert torch.isfinite(y).all() and y[0] == 0 and (y[:3].abs() <= MIN_SCALE).all()
    # a weight row of near-zero values: finite, and zeros stay zero
    w = torch.randn(4, 16)
    w[2] = torch.tensor([0.0, 1e-41] * 8)
    q = fake_quantize_weight(w, QScheme(bits=8, symmetric=symmetric))
    assert torch.isfinite(q).all() and (q[2, ::2] == 0).all()
    # normal ranges keep their exact scale (max|r| / 127)
    s, _ = qparams(torch.tensor(-1.0), torch.tensor(0.5), 8, True)
    assert s == torch.tensor(1.0) / 127
