"""Algorithm 1 batched over a model's layers (segment_probabilities), the one-sync sample (sample_segments) and
the batched encode (AtomicCodec.encode_many through LayerPolicy.encode)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from atomo_core import LayerPolicy, atomic_probabilities, decode, make_codec
from atomo_core.decompositions import spectral
from atomo_core.probabilities import SegmentLayout, batched_atomic_probabilities, segment_probabilities
from atomo_core.sampling import sample_segments

_BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(_BENCH))  # bench/syncs.py imports bench/timing.py
_spec = importlib.util.spec_from_file_location("bench_syncs", _BENCH / "syncs.py")
bench_syncs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_syncs)


def _layers(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Random and adversarial coefficient vectors: zeros, ties, geometric tails, a huge outlier, tiny values."""
    g = torch.Generator().manual_seed(seed)
    geometric = 2.0 ** -torch.arange(60, dtype=torch.float64)
    ties = torch.ones(300)
    ties[::3] = 0
    tiny = torch.randn(500, generator=g, dtype=torch.float64) * 1e-30
    tiny[0] = 1e30
    layers = [
        torch.randn(7, generator=g),
        torch.randn(5000, generator=g),  # spans two 4096 blocks
        torch.zeros(40),
        torch.zeros(0),
        ties,
        geometric * torch.sign(torch.randn(60, generator=g, dtype=torch.float64)),
        torch.randn(9000, generator=g) ** 5,  # heavy tail
        tiny,
        torch.cat([torch.zeros(3000), torch.randn(4, generator=g)]),  # few non-zeros
    ]
    return [layer.to(dtype) for layer in layers]


def _assert_matches(batched: torch.Tensor, lam: torch.Tensor, budget: float) -> None:
    expected = atomic_probabilities(lam, budget)
    assert batched.dtype == lam.dtype and batched.shape == lam.shape
    # Same support as (3) requires: p_i > 0 exactly where lam_i != 0.
    assert torch.equal(batched > 0, lam != 0)
    assert bool((batched <= 1).all())
    rtol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}[lam.dtype]
    # atol: where c |lam_i| is near the dtype's smallest normal number (float16's subnormals above all), a
    # rounding of c decides between a subnormal p_i and p_i raised to that number.
    torch.testing.assert_close(batched, expected, rtol=rtol, atol=torch.finfo(lam.dtype).tiny)
    if lam.dtype == torch.float16:  # p_i raised to float16's smallest normal number add up beyond s
        return
    nnz = int(torch.count_nonzero(lam))
    assert math.isclose(float(batched.double().sum()), min(budget, nnz), rel_tol=10 * rtol, abs_tol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [0.5, 1, 3, 17.5, 40, 1e6])
def test_batched_probabilities_equal_the_per_layer_ones(dtype, budget):
    layers = _layers(0, dtype)
    if dtype == torch.float16:
        layers = [layer.clamp(-6e4, 6e4) for layer in layers]
    for lam, p in zip(layers, batched_atomic_probabilities(layers, budget), strict=True):
        _assert_matches(p, lam, budget)


def test_per_layer_budgets_and_mixed_dtypes():
    layers = _layers(1)
    layers[1] = layers[1].double()
    budgets = [1.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.5, 8.0, 2.0]
    for lam, p, budget in zip(layers, batched_atomic_probabilities(layers, budgets), budgets, strict=True):
        _assert_matches(p, lam, budget)


def test_small_budgets_reach_the_fixed_point_in_the_fixed_passes():
    """ceil(s) - 1 Newton updates reach the fixed point (the clipped set has < s atoms): no layer is flagged
    for the per-layer finish, and p is exact without it. (A rounding tie at the clip threshold, as the
    1e30 outlier of _layers with s = 1, is flagged, like the per-layer code's scan: see the test below.)"""
    layers = [layer for i, layer in enumerate(_layers(2)) if i != 7]
    layout = SegmentLayout([lam.numel() for lam in layers])
    for budget in (1, 2, 3, 4.5, 17):
        p, flags = segment_probabilities(layout.flatten(layers, torch.float32), layout, [budget] * len(layers))
        assert flags.tolist() == [True] * (len(layers) + 1)
        for lam, part in zip(layers, layout.split(p), strict=True):
            _assert_matches(part, lam, budget)


@pytest.mark.parametrize(
    ("lam", "budget"),
    [
        (0.5 ** torch.arange(1000, dtype=torch.float64), 100.0),  # 23 Newton passes, beyond the 16 + 1
        (torch.tensor([1e30] + [1e-30] * 499, dtype=torch.float32), 1.0),  # c |lam_0| = 1 = s: a rounding tie
    ],
)
def test_layers_beyond_the_fixed_passes_are_flagged_and_finished_exactly(lam, budget):
    """A layer that did not reach its fixed point in the fixed passes is flagged inexact, and the batched
    result (finished by atomic_probabilities) is still exact."""
    other = torch.randn(5, generator=torch.Generator().manual_seed(0)).to(lam.dtype)
    layout = SegmentLayout([lam.numel(), 5])
    _, flags = segment_probabilities(layout.flatten([lam, other], lam.dtype), layout, [budget, budget])
    assert flags.tolist() == [True, False, True]
    _assert_matches(batched_atomic_probabilities([lam, other], budget)[0], lam, budget)


def test_non_finite_coefficients_raise_value_error():
    layers = _layers(3)
    layers[4] = layers[4].clone()
    layers[4][5] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        batched_atomic_probabilities(layers, 3.0)


def test_sample_segments_splits_the_sample_per_layer():
    """p of 0 and 1 make the sample certain: each layer's indices are its p = 1 positions; with a sample far
    beyond the host's bound (budgets that p ignores) the exact fallback gives the same."""
    g = torch.Generator().manual_seed(4)
    lengths = [10, 0, 5000, 3, 9000]
    layers = [(torch.rand(n, generator=g) < 0.3).double() for n in lengths]
    layout = SegmentLayout(lengths)
    flat = layout.flatten(layers, torch.float64)
    for budgets in ([1e6] * len(lengths), [0.1] * len(lengths)):  # the second: size > bound, the fallback
        sample = sample_segments(flat, flat * 3, layout, budgets, torch.Generator().manual_seed(0))
        for layer, index, host_index, host_lam, host_p in zip(
            layers, sample.index, sample.host_index, sample.host_lam, sample.host_p, strict=True
        ):
            expected = torch.nonzero(layer).reshape(-1)
            assert torch.equal(index, expected)
            assert host_index.tolist() == expected.tolist()
            assert host_p.tolist() == [1.0] * len(expected) and host_lam.tolist() == [3.0] * len(expected)


def _model_tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (8, 6, 3, 3), (5,), (20, 12), (10, 30)]
    tensors = [torch.randn(shape, generator=g) for shape in shapes]
    tensors[3][2] = 0  # a zero row
    return tensors


def _policy(label: str) -> LayerPolicy:
    """The policy of codec `label`, which encodes every >= 2-D tensor of _model_tensors (none goes dense)."""
    name, params = CODECS[label]
    policy = LayerPolicy(make_codec(name, **params), batched=True)
    assert all(policy.codec_for_shape(tuple(t.shape)) is policy.codec for t in _model_tensors(0) if t.dim() >= 2)
    return policy


CODECS = {
    "svd exact": ("svd", {"budget": 2}),
    "svd warm": ("svd", {"budget": 2, "basis": "warm", "rank": 1}),
    "entrywise": ("entrywise", {"budget": 5}),
    "fourier": ("fourier", {"budget": 5}),
}


def _z_scores(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(mean - truth) / standard error of 20 fixed random projections <v, g^> of the samples (rows): each
    averages many coordinates, so its mean is close to normal even where single coordinates are rarely
    sampled (a coordinate never selected in the run would have no spread to estimate its error from)."""
    directions = torch.randn(20, truth.numel(), generator=torch.Generator().manual_seed(11), dtype=samples.dtype)
    projected = samples @ directions.T
    se = projected.std(0) / math.sqrt(samples.shape[0])
    return (projected.mean(0) - directions @ truth) / se


@pytest.mark.parametrize("label", sorted(CODECS))
def test_batched_encode_through_the_policy_is_unbiased(label):
    """Mean of 2000 batched encodes of a small model against the gradient, |z| < 5 on each of 20 random
    projections (fixed seeds); the same samples with p not inverted (each selected atom weighted lam_i, not lam_i / p_i)
    fail the test, so it can see a bias."""
    tensors = _model_tensors(5)
    policy = _policy(label)
    generator = torch.Generator().manual_seed(6)
    flat_truth = torch.cat([t.reshape(-1) for t in tensors])
    samples, biased = [], []
    for _ in range(2000):
        estimates = [decode(bytes(m)) for m in policy.encode(tensors, generator)]
        samples.append(torch.cat([e.reshape(-1) for e in estimates]))
        if label == "entrywise":  # the selected entries, weighted lam_i instead of lam_i / p_i
            biased.append(torch.where(samples[-1] != 0, flat_truth, 0.0))
    z = _z_scores(torch.stack(samples).double(), flat_truth.double())
    assert float(z.abs().max()) < 5, label
    if biased:
        assert float(_z_scores(torch.stack(biased).double(), flat_truth.double()).abs().max()) > 10


@pytest.mark.parametrize("label", sorted(CODECS))
def test_the_batched_encode_makes_one_host_sync_per_model(label):
    """Counted with bench/syncs.py's SyncCounter (item, bool, int, float, tolist, cpu, nonzero, mask
    indexing, linalg.eigh...): the sample's one copy, and for the warm basis one batched eigh of all layers'
    Rayleigh-Ritz matrices. The svd exact route's CPU-only eigensolver branch (per layer, zero rows found by
    nonzero, fp32 results checked with bool) is left out of the count: on CUDA that route takes none of it."""
    policy = _policy(label)
    tensors = _model_tensors(7)
    policy.encode(tensors, torch.Generator().manual_seed(0))  # the warm basis's second step too
    with bench_syncs.SyncCounter() as counter:
        policy.encode(tensors, torch.Generator().manual_seed(1))
    counted = {key: n for key, n in counter.sites.items() if key[1] != "spectral.py:_gram_eigen"}
    expected = {("cpu", "sampling.py:sample_segments"): 1}
    if label == "svd warm":
        expected[("linalg.eigh", "spectral.py:ritz_rotations")] = 1
    assert counted == expected


def test_the_cuda_eigensolver_route_makes_one_sync_per_matrix_size(monkeypatch):
    """The svd exact route as on CUDA (forced here): one batched eigh per distinct n, then the sample's copy."""
    monkeypatch.setattr(spectral, "batched_exact_route", lambda y: True)
    policy = _policy("svd exact")
    tensors = _model_tensors(7)
    with bench_syncs.SyncCounter() as counter:
        policy.encode(tensors, torch.Generator().manual_seed(1))
    sizes = {min(t.shape[0], math.prod(t.shape[1:])) for t in tensors if t.dim() >= 2}
    assert counter.sites == {
        ("linalg.eigh", "spectral.py:_gram_eigen_batched"): len(sizes),
        ("cpu", "sampling.py:sample_segments"): 1,
    }


def test_the_per_layer_path_made_many_syncs():
    """The counter sees the per-layer path's syncs (so a count of one above is not blindness)."""
    policy = LayerPolicy(make_codec("entrywise", budget=5))
    with bench_syncs.SyncCounter() as counter:
        bench_syncs.per_layer_encode(policy, _model_tensors(7), torch.Generator().manual_seed(1))
    assert counter.total >= 4 * 4


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("label", sorted(CODECS))
def test_a_non_finite_gradient_raises_value_error_and_keeps_the_state(label, value):
    """NaN or an infinity (which failed the CPU eigensolver with a LinAlgError): a ValueError naming it, and the
    policy's state unchanged."""
    policy = _policy(label)
    tensors = _model_tensors(8)
    policy.encode(tensors, torch.Generator().manual_seed(0))
    before = {i: policy.state(i) for i in range(len(tensors))}
    tensors[4] = tensors[4].clone()
    tensors[4][1, 2] = value
    with pytest.raises(ValueError, match="finite"):
        policy.encode(tensors, torch.Generator().manual_seed(1))
    assert all(policy.state(i) is before[i] for i in range(len(tensors)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_probabilities_on_cuda_equal_the_per_layer_ones(dtype):
    layers = [layer.cuda() for layer in _layers(9, dtype)]
    for budget in (1, 3, 40, 1e6):
        for lam, p in zip(layers, batched_atomic_probabilities(layers, budget), strict=True):
            assert p.device == lam.device
            _assert_matches(p, lam, budget)
