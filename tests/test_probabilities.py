"""Algorithm 1 (`atomic_probabilities`) against independent solvers of problem (3)."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from atomo_core import atomic_probabilities


def kkt_bisection(lam: np.ndarray, s: float) -> np.ndarray:
    """Problem (3) by bisection on the KKT scale c of p_i = min(1, c |lam_i|) (Appendix B, eq. (14))."""
    a = np.abs(lam.astype(np.float64))
    s = min(s, np.count_nonzero(a))
    lo, hi = 0.0, 1.0
    while np.minimum(1.0, hi * a).sum() < s:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(1.0, mid * a).sum() < s else (lo, mid)
    return np.minimum(1.0, hi * a)


def objective(lam: np.ndarray, p: np.ndarray) -> float:
    """f(p) = sum lam_i^2 / p_i over the non-zero coefficients."""
    nz = lam != 0
    return float(np.sum(lam[nz].astype(np.float64) ** 2 / p[nz]))


def sample(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(n)
    if kind == "cauchy":
        return rng.standard_cauchy(n)
    if kind == "pareto":
        return (rng.pareto(0.7, n) + 1.0) * rng.choice([-1.0, 1.0], n)
    if kind == "balanced":
        return rng.uniform(0.9, 1.1, n) * rng.choice([-1.0, 1.0], n)
    if kind == "unbalanced":
        lam = rng.standard_normal(n) * 1e-3
        lam[rng.choice(n, 3, replace=False)] = [50.0, -20.0, 5.0]
        return lam
    if kind == "geometric":  # needs many passes: exercises the top-coefficient scan
        return 0.5 ** np.arange(n) * rng.choice([-1.0, 1.0], n)
    raise ValueError(kind)


KINDS = ["normal", "cauchy", "pareto", "balanced", "unbalanced", "geometric"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [1, 2.5, 7, 60, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_kkt_bisection(kind, budget, dtype):
    rng = np.random.default_rng(KINDS.index(kind) * 1000 + int(budget * 10))
    lam = sample(kind, 1000, rng)
    lam_t = torch.tensor(lam, dtype=dtype)
    p = atomic_probabilities(lam_t, budget)
    assert p.dtype == dtype and p.shape == lam_t.shape
    assert bool(((p >= 0) & (p <= 1)).all())
    lam32 = lam_t.double().numpy()  # the coefficients as the solver saw them
    ref = kkt_bisection(lam32, budget)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(p.double().numpy(), ref, rtol=tol, atol=tol)
    assert p.double().sum().item() == pytest.approx(min(budget, np.count_nonzero(lam32)), rel=tol)
    assert objective(lam32, p.double().numpy()) == pytest.approx(objective(lam32, ref), rel=10 * tol)


@pytest.mark.parametrize("seed", range(6))
def test_objective_matches_slsqp(seed):
    rng = np.random.default_rng(seed)
    n = 12
    lam = rng.standard_cauchy(n) if seed % 2 else rng.standard_normal(n)
    budget = float(rng.uniform(1, 6))
    result = minimize(
        lambda p: np.sum(lam**2 / p),
        x0=np.full(n, budget / n),
        jac=lambda p: -(lam**2) / p**2,
        bounds=[(1e-9, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda p: p.sum() - budget, "jac": lambda p: np.ones(n)}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    # SLSQP may stop on a line search near the optimum: check that its point is feasible instead.
    assert result.x.sum() == pytest.approx(budget, rel=1e-8) and result.x.max() <= 1.0
    p = atomic_probabilities(torch.tensor(lam), budget).numpy()
    # Algorithm 1 is optimal: never worse than SLSQP, and SLSQP gets within its tolerance of it.
    assert objective(lam, p) <= result.fun * (1 + 1e-9)
    assert objective(lam, p) == pytest.approx(result.fun, rel=1e-5)


def test_balanced_closed_form():
    """Lemma 2: for an s-balanced lam (s <= ||lam||_1 / ||lam||_inf), p = |lam| s / ||lam||_1."""
    lam = torch.tensor([0.5, -1.0, 0.75, -0.8, 0.9, 0.6], dtype=torch.float64)
    budget = 3.0
    assert budget <= lam.abs().sum() / lam.abs().max()
    expected = lam.abs() * budget / lam.abs().sum()
    torch.testing.assert_close(atomic_probabilities(lam, budget), expected, rtol=1e-12, atol=0)


def test_unbalanced_entry_is_clipped():
    """Lemma 3 / Theorem 4: an s-unbalanced entry gets p = 1, the rest share s - 1 in proportion."""
    lam = torch.tensor([10.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    p = atomic_probabilities(lam, 2)
    torch.testing.assert_close(p, torch.tensor([1.0, 0.25, 0.25, 0.5], dtype=torch.float64))


def test_zeros_get_probability_zero_exactly():
    lam = torch.tensor([0.0, 3.0, 0.0, -1.0, 0.5, 0.0])
    p = atomic_probabilities(lam, 1.5)
    assert torch.equal(p == 0, lam == 0)
    assert p.sum().item() == pytest.approx(1.5)


def test_all_zero_and_budget_at_least_nnz():
    assert torch.equal(atomic_probabilities(torch.zeros(5), 2), torch.zeros(5))
    lam = torch.tensor([0.0, -2.0, 1e-30, 0.0, 7.0])
    assert torch.equal(atomic_probabilities(lam, 3), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]))
    assert torch.equal(atomic_probabilities(lam, 100.5), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]))


def test_single_atom_and_fractional_budget():
    assert torch.equal(atomic_probabilities(torch.tensor([-4.0]), 0.25), torch.tensor([0.25]))
    assert torch.equal(atomic_probabilities(torch.tensor([-4.0]), 1), torch.tensor([1.0]))


def test_huge_dynamic_range_keeps_the_small_tail():
    """A total dominated by one coefficient must not wipe out the others' sum (no total - prefix)."""
    lam = torch.tensor([1e30, 1.0, 1.0, 2.0], dtype=torch.float32)
    p = atomic_probabilities(lam, 2)
    torch.testing.assert_close(p, torch.tensor([1.0, 0.25, 0.25, 0.5]))


def test_half_precision_input():
    lam = torch.randn(100, generator=torch.Generator().manual_seed(0)).half()
    p = atomic_probabilities(lam, 10)
    assert p.dtype == torch.float16
    assert p.float().sum().item() == pytest.approx(10, rel=1e-2)


@pytest.mark.parametrize("budget", [0, -1, float("nan"), float("inf"), "three"])
def test_invalid_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        atomic_probabilities(torch.ones(3), budget)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rejects_non_finite_coefficients(bad):
    with pytest.raises(ValueError, match="finite"):
        atomic_probabilities(torch.tensor([1.0, bad, 2.0]), 1)


def test_rejects_non_vector():
    with pytest.raises(ValueError, match="1-D"):
        atomic_probabilities(torch.ones(2, 2), 1)
