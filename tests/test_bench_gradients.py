"""The gradient study's math (atomo_core.analysis) against brute force and Lemma 1, and the study end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from atomo_core import LayerPolicy, dense_nbytes, make_codec
from atomo_core.analysis import relative_variance, singular_values, spectral_variance, theorem6_ratio
from atomo_core.models import build_model
from services.bench.gradients import StudyConfig, codec_grid, run_study


@pytest.fixture(scope="module")
def lenet_gradient() -> list[torch.Tensor]:
    """A real LeNet-5 gradient: one batch of 16 random images after a few SGD steps."""
    torch.manual_seed(0)
    model = build_model("lenet5", in_channels=3)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.05)
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("shape", [(5, 7), (8, 3), (1, 6), (12, 12)])
def test_theorem6_ratio_matches_brute_force(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    nuclear = float(torch.linalg.svdvals(x).sum())  # a full SVD, not the Gram route the module uses
    entrywise = sum(abs(float(v)) for v in x.flatten())
    n, m = shape
    assert theorem6_ratio(x) == pytest.approx((n + m) * nuclear**2 / entrywise**2, rel=1e-9)
    assert theorem6_ratio(x.float()) == pytest.approx(theorem6_ratio(x), rel=1e-5)
    # Lemma 7: ||X||_{1,1} / sqrt(nm) <= ||X||_* <= ||X||_{1,1}
    assert (n + m) / (n * m) - 1e-12 <= theorem6_ratio(x) <= n + m + 1e-12


def test_theorem6_ratio_attains_lemma7_bounds():
    n, m = 4, 6
    assert theorem6_ratio(torch.ones(n, m)) == pytest.approx((n + m) / (n * m))  # rank one, flat: spectral wins
    assert theorem6_ratio(torch.eye(n, m)) == pytest.approx(n + m)  # entry-wise sparse: entry-wise wins
    with pytest.raises(ValueError, match="zero"):
        theorem6_ratio(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="matrix"):
        theorem6_ratio(torch.ones(3))


def test_singular_values_descending_and_exact():
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(singular_values(x), torch.linalg.svdvals(x), rtol=1e-9, atol=1e-12)


def test_measured_variance_agrees_with_lemma1(lenet_gradient):
    """Spectral ATOMO s=2: the mean over independent encodings of ||g^ - g||^2 / ||g||^2 against the closed form
    sum_i lam_i^2 / p_i - ||g||^2 (Lemma 1) over the matrix layers (1-D layers go dense: no variance)."""
    budget, encodings = 2, 400
    norm2 = sum(float(t.double().square().sum()) for t in lenet_gradient)
    closed = sum(spectral_variance(t, budget) for t in lenet_gradient if t.dim() >= 2) / norm2
    policy = LayerPolicy(make_codec("svd", budget=budget, basis="exact"))  # Lemma 1 over the singular values
    estimate = relative_variance(policy, lenet_gradient, encodings, seed=7)
    assert closed > 0.1  # a real variance to test, not a degenerate one
    assert abs(estimate.mean - closed) <= 4 * estimate.stderr, (estimate.mean, estimate.stderr, closed)
    assert estimate.stderr < 0.1 * closed  # enough encodings for the check to mean something


def test_bytes_are_the_policys_messages(lenet_gradient):
    encodings, seed = 3, 11
    estimate = relative_variance(lambda: LayerPolicy(make_codec("qsgd", bits=4)), lenet_gradient, encodings, seed)
    expected = []
    for e in range(encodings):
        messages = LayerPolicy(make_codec("qsgd", bits=4)).encode(
            lenet_gradient, torch.Generator().manual_seed(seed + e)
        )
        expected.append(sum(len(m) for m in messages))
    assert list(estimate.nbytes) == expected
    assert estimate.messages == len(lenet_gradient)
    dense = relative_variance(LayerPolicy(make_codec("dense")), lenet_gradient, 2)
    assert dense.errors == (0.0, 0.0)
    assert set(dense.nbytes) == {sum(dense_nbytes(tuple(t.shape)) for t in lenet_gradient)}


@pytest.mark.parametrize("name,params", [("topk", {"budget": 20}), ("powersgd", {"rank": 1})])
def test_a_policy_with_feedback_encodes_every_sample_without_memory(lenet_gradient, name, params):
    """A LayerPolicy passed in (not a factory) keeps no error-feedback memory from one encoding to the next:
    the same errors as a fresh policy per encoding (topk, deterministic: the same error every time)."""
    policy = LayerPolicy(make_codec(name, **params))
    kept = relative_variance(policy, lenet_gradient, 3, seed=4)
    fresh = relative_variance(lambda: LayerPolicy(make_codec(name, **params)), lenet_gradient, 3, seed=4)
    assert kept.errors == fresh.errors and kept.nbytes == fresh.nbytes
    if name == "topk":
        assert len(set(kept.errors)) == 1


def test_relative_variance_refuses_bad_input(lenet_gradient):
    policy = LayerPolicy(make_codec("dense"))
    with pytest.raises(ValueError, match="encodings"):
        relative_variance(policy, lenet_gradient, 0)
    with pytest.raises(ValueError, match="squared norm"):
        relative_variance(policy, [torch.zeros(3, 3)], 1)


def test_study_end_to_end(tmp_path):
    config = StudyConfig(models=("lenet5",), capture_steps=(0, 2), batch_size=8, encodings=2, train_size=64)
    path = run_study(tmp_path, config=config)
    study = json.loads(path.read_text())
    assert study["dataset"] in ("cifar10", "synthetic") and study["capture_steps"] == [0, 2]
    model = study["models"]["lenet5"]
    assert [c["label"] for c in model["codecs"]] == [c.label for c in codec_grid()]
    dense = next(c for c in model["codecs"] if c["label"] == "dense")
    assert dense["relative_variance"] == 0 and dense["bytes"] == model["dense_bytes"]
    for row in model["codecs"]:
        assert row["error"] is None, row
        assert 0 < row["bytes"] <= model["dense_bytes"] and math.isfinite(row["relative_variance"])
        assert row["biased"] == (row["name"] in ("topk", "powersgd"))
    assert len(model["layers"]) == model["matrices"] == 5  # 2 convolutions, 3 fully connected layers
    for layer in model["layers"]:
        assert len(layer["theorem6_rows"]) == len(layer["top3_energy"]) == 2
        n, m = layer["rows"]
        assert all((n + m) / (n * m) - 1e-9 <= r <= n + m + 1e-9 for r in layer["theorem6_rows"])
    for spectrum in model["spectra"]:
        assert len(spectrum["values"]) == 2 and all(v[0] == pytest.approx(1.0) for v in spectrum["values"])
