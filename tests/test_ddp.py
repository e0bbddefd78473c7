"""The DDP communication hook in real process groups: spawned ranks, gloo over loopback (NCCL where CUDA is).

Each test spawns its ranks once and runs a list of scenarios in them (process start-up dominates the time);
each rank returns plain data, and the assertions are made here, across ranks. The model is a small MLP on
scikit-learn's digits pooled to 8x8 (64 features), so that a few hundred steps take seconds.
"""

import dataclasses
import hashlib
import math
import multiprocessing
import queue
import threading
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from atomo_core import LayerPolicy, WireFormatError, make_codec, register_codec
from atomo_core.data import BatchStream, Split, load_dataset
from atomo_core.ddp import AtomoHookState, _parse, _serialize, atomo_hook
from atomo_core.decompositions.spectral import SpectralCodec, SpectralDecomposition
from atomo_core.models import build_model

SPAWN_TIMEOUT_S = 120
UNBIASED_STEPS = 300
IDENTITY_STEPS = 300
IDENTITY_CODECS = {  # every built-in family: products (svd, powersgd), FFT (fourier), sparse, quantized
    "svd": {"budget": 3},
    "entrywise": {"budget": 300},
    "fourier": {"budget": 300},
    "qsgd": {"bits": 4},
    "topk": {"budget": 300},
    "powersgd": {"rank": 4},
}
Z_LIMIT = 4.0  # |z| beyond 4 has probability 6e-5 per direction for an unbiased estimator


class UnscaledSpectralDecomposition(SpectralDecomposition):
    """Spectral atoms sampled as ATOMO does, but sent with weight lam_i instead of lam_i / p_i: biased
    (E = sum p_i lam_i a_i), with the same kind of variance, to show that the z-test below detects bias."""

    def pack(self, state, index, lam, p):
        return super().pack(state, index, lam, torch.ones_like(p))


@register_codec
class UnscaledSpectralCodec(SpectralCodec):
    name = "svd-unscaled-test"
    codec_id = 201
    decomposition_type = UnscaledSpectralDecomposition


@dataclasses.dataclass
class RankLocalFailurePolicy(LayerPolicy):
    """A LayerPolicy whose encode misbehaves on rank `rank` only: "raise" raises a RuntimeError (as an
    eigensolver that did not converge), "oversize" returns messages far larger than the bucket's dense size."""

    rank: int = 1
    mode: str = "raise"

    def encode(self, tensors, generator=None):
        if dist.get_rank() != self.rank:
            return super().encode(tensors, generator)
        if self.mode == "raise":
            raise RuntimeError("linalg.eigh: the algorithm failed to converge (test)")
        return [self._dense.encode(torch.zeros(100_000)) for _ in tensors]


def _model(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(device)


def _digits(device):
    train, test, _ = load_dataset("digits")
    pool = lambda split: (F.avg_pool2d(split.x, 4).to(device), split.y.to(device))  # noqa: E731  32x32 -> 8x8
    return pool(train), pool(test)


def _ddp(model, device):
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach().cpu().double()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _allreduce_average(model, x, y, world) -> torch.Tensor:
    """The exact average of the ranks' gradients, by a plain all_reduce outside DDP."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach()
    dist.all_reduce(grad)
    return (grad / world).cpu().double()


def scenario_train(rank, world, device):
    """150 SGD steps with plain allreduce and with ATOMO (svd, s = 2) from the same start and batches."""
    (train_x, train_y), (test_x, test_y) = _digits(device)
    results = {}
    for label, codec in (("allreduce", None), ("atomo", make_codec("svd", budget=2))):
        model = _model(device)
        ddp = _ddp(model, device)
        state = None
        if codec is not None:
            state = AtomoHookState(codec, seed=1)
            ddp.register_comm_hook(state, atomo_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        stream = BatchStream(Split(train_x, train_y), rank, world, 32, seed=0)
        grad_digests = []
        for step in range(150):
            x, y = stream.batch(step)
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            if step % 50 == 0:
                grad_digests.append(_digest(_flat_grad(model)))
            optimizer.step()
        with torch.no_grad():
            logits = model(test_x)
            results[label] = {
                "test_loss": float(F.cross_entropy(logits, test_y)),
                "test_accuracy": float((logits.argmax(1) == test_y).float().mean()),
                "params": _digest(torch.cat([p.reshape(-1) for p in model.parameters()])),
                "grads": grad_digests,
                "bytes_per_step": state.bytes_sent / state.step if state else None,
            }
    return results


def scenario_unbiased(rank, world, device):
    """Errors of the hooked average against the exact allreduce average, at a fixed model and fixed batches,
    projected on the exact average's direction and on three random directions, for ATOMO and for the biased
    unscaled codec."""
    (train_x, train_y), _ = _digits(device)
    x, y = train_x[rank * 64 : (rank + 1) * 64], train_y[rank * 64 : (rank + 1) * 64]
    model = _model(device)
    exact = _allreduce_average(model, x, y, world)
    directions = torch.randn(3, exact.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    directions = torch.cat([exact.unsqueeze(0), directions])
    directions /= directions.norm(dim=1, keepdim=True)
    out = {}
    for label, codec in (("atomo", make_codec("svd", budget=1)), ("unscaled", UnscaledSpectralCodec(budget=1))):
        model = _model(device)
        ddp = _ddp(model, device)
        ddp.register_comm_hook(AtomoHookState(codec, seed=2), atomo_hook)
        projections, digests = [], []
        for _ in range(UNBIASED_STEPS):
            ddp.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            grad = _flat_grad(model)
            projections.append((directions @ (grad - exact)).tolist())
            digests.append(_digest(grad))
        out[label] = {"projections": projections, "digests": digests}
    return out


def scenario_start_step(rank, world, device):
    """start_step = 3: per step, the distance to the exact average, the bytes counted and the step counter."""
    (train_x, train_y), _ = _digits(device)
    x, y = train_x[rank * 32 : (rank + 1) * 32], train_y[rank * 32 : (rank + 1) * 32]
    model = _model(device)
    exact = _allreduce_average(model, x, y, world)
    ddp = _ddp(model, device)
    state = AtomoHookState(make_codec("svd", budget=1), seed=3, start_step=3)
    ddp.register_comm_hook(state, atomo_hook)
    steps = []
    for _ in range(6):
        ddp.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        distance = float((_flat_grad(model) - exact).norm() / exact.norm())
        steps.append({"distance": distance, "bytes": state.last_step_bytes, "step": state.step})
    numel = sum(p.numel() for p in model.parameters())
    return {"steps": steps, "dense_bytes": 4 * numel, "bytes_sent": state.bytes_sent}


def scenario_feedback(rank, world, device):
    """topk with error feedback through the hook, in several buckets: after T compressed steps at a fixed
    gradient, the sum of the hooked averages plus the ranks' mean residual is T times the exact average
    (EF-SGD's invariant), which holds only if every layer kept its own memory from step to step."""
    (train_x, train_y), _ = _digits(device)
    x, y = train_x[rank * 32 : (rank + 1) * 32], train_y[rank * 32 : (rank + 1) * 32]
    model = _model(device)
    exact = _allreduce_average(model, x, y, world)
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=0.001)
    state = AtomoHookState(make_codec("topk", budget=20), seed=4, start_step=1)
    ddp.register_comm_hook(state, atomo_hook)
    total = torch.zeros_like(exact)
    for step in range(7):
        ddp.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        if step >= state.start_step:
            total += _flat_grad(model)
    residuals = {}
    for pointers, policy in state.policies.items():
        for index, pointer in enumerate(pointers):
            feedback = policy.feedback(index)
            residuals[pointer] = feedback.residual.reshape(-1) if feedback is not None else None
    residual = torch.cat(
        [
            residuals[p.data_ptr()] if residuals[p.data_ptr()] is not None else torch.zeros(p.numel(), device=device)
            for p in model.parameters()
        ]
    ).double()
    dist.all_reduce(residual)
    steps = 7 - state.start_step
    return {
        "buckets": len(state.policies),
        "with_memory": sum(r is not None for r in residuals.values()),
        "invariant_error": float((total + residual.cpu() / world - steps * exact).norm() / (steps * exact.norm())),
        "residual": float(residual.norm() / world / exact.norm()),
        "digest": _digest(total),
    }


def scenario_regroup(rank, world, device):
    """topk from step 0 in small buckets: per step, the buckets the hook saw and the state's policy keys (DDP
    regroups the buckets after the first step; the old buckets' policies must go)."""
    (train_x, train_y), _ = _digits(device)
    x, y = train_x[rank * 16 : (rank + 1) * 16], train_y[rank * 16 : (rank + 1) * 16]
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(_model(device), device_ids=ids, bucket_cap_mb=0.001)
    state = AtomoHookState(make_codec("topk", budget=5), seed=6)
    seen = []

    def recording_hook(hook_state, bucket):
        seen.append(tuple(p.data_ptr() for p in bucket.parameters()))
        return atomo_hook(hook_state, bucket)

    ddp.register_comm_hook(state, recording_hook)
    steps = []
    for _ in range(4):
        seen.clear()
        ddp.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        steps.append({"buckets": sorted(seen), "policies": sorted(state.policies)})
    return steps


def scenario_failures(rank, world, device):
    """One rank's encode raises (a test policy; a NaN gradient given to topk), or one rank's buffer is far
    larger than dense: the error each rank raises, then a normal step in the same group."""
    (train_x, train_y), _ = _digits(device)
    x, y = train_x[rank * 16 : (rank + 1) * 16], train_y[rank * 16 : (rank + 1) * 16]
    nan_x = x.clone()
    if rank == 1:
        nan_x[0, 0, 0, 0] = math.nan
    cases = {
        "raise": (RankLocalFailurePolicy(make_codec("svd", budget=2)), x),
        "nan": (LayerPolicy(make_codec("topk", budget=5)), nan_x),
        "oversize": (RankLocalFailurePolicy(make_codec("svd", budget=2), mode="oversize"), x),
    }
    out = {}
    for label, (policy, inputs) in cases.items():
        ddp = _ddp(_model(device), device)
        state = AtomoHookState(policy, seed=7)
        ddp.register_comm_hook(state, atomo_hook)
        try:
            F.cross_entropy(ddp(inputs), y).backward()
            out[label] = {"error": None}
        except RuntimeError as exc:
            out[label] = {"error": str(exc), "cause": type(exc.__cause__).__name__ if exc.__cause__ else None}
        out[label]["step"] = state.step
    ddp = _ddp(_model(device), device)
    ddp.register_comm_hook(AtomoHookState(make_codec("svd", budget=2), seed=7), atomo_hook)
    F.cross_entropy(ddp(x), y).backward()
    out["after"] = _digest(_flat_grad(ddp.module))
    return out


def scenario_mismatch(rank, world, device):
    """The last rank alone uses another budget, then (a fresh model) another start_step: the errors raised."""
    (train_x, train_y), _ = _digits(device)
    x, y = train_x[:16], train_y[:16]
    last = rank == world - 1
    errors = []
    for budget, start_step in ((3 if last else 2, 0), (2, 2 if last else 0)):
        ddp = _ddp(_model(device), device)
        ddp.register_comm_hook(AtomoHookState(make_codec("svd", budget=budget), start_step=start_step), atomo_hook)
        try:
            F.cross_entropy(ddp(x), y).backward()
            errors.append(None)
        except RuntimeError as exc:
            errors.append(str(exc))
    return errors


def scenario_identity(rank, world, device):
    """Per codec, IDENTITY_STEPS SGD steps of LeNet-5 on random batches (different on every rank), with a
    thread beside the rank keeping the CPU busy with matmuls: the sha256 of every hooked bucket at every step,
    as the hook's future hands it to DDP."""
    stop = threading.Event()

    def busy():
        a = torch.randn(192, 192)
        while not stop.is_set():
            a = torch.tanh(a @ a)

    threading.Thread(target=busy, daemon=True).start()
    try:
        out = {}
        for name, params in IDENTITY_CODECS.items():
            torch.manual_seed(0)
            model = build_model("lenet5", 10, 1).to(device)
            ddp = _ddp(model, device)
            digests = []

            def recording_hook(hook_state, bucket, digests=digests):
                def record(fut):
                    averaged = fut.value()
                    digests.append((hook_state.step, bucket.index(), _digest(averaged)))
                    return averaged

                return atomo_hook(hook_state, bucket).then(record)

            ddp.register_comm_hook(AtomoHookState(make_codec(name, **params), seed=11), recording_hook)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            generator = torch.Generator().manual_seed(100 + rank)
            for _ in range(IDENTITY_STEPS):
                x = torch.randn(4, 1, 32, 32, generator=generator).to(device)
                y = torch.randint(0, 10, (4,), generator=generator).to(device)
                optimizer.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                optimizer.step()
            out[name] = digests
        return out
    finally:
        stop.set()


SCENARIOS = {
    f.__name__.removeprefix("scenario_"): f
    for f in (
        scenario_train,
        scenario_unbiased,
        scenario_start_step,
        scenario_feedback,
        scenario_regroup,
        scenario_failures,
        scenario_mismatch,
        scenario_identity,
    )
}


def _rank_main(rank, world, backend, init_file, scenarios, results, threads):
    try:
        torch.set_num_threads(threads)
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
        out = {name: SCENARIOS[name](rank, world, device) for name in scenarios}
        dist.destroy_process_group()
        results.put((rank, out))
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))


def run_ranks(
    world: int,
    scenarios: list[str],
    tmp_path,
    backend: str = "gloo",
    timeout: float = SPAWN_TIMEOUT_S,
    threads: list[int] | None = None,
) -> list[dict]:
    """Spawn `world` ranks that run `scenarios`, rank r with torch.set_num_threads(threads[r]) (default 1);
    their results in rank order. Fails (and kills the ranks) on a rank's exception or when they do not all
    answer within `timeout` seconds of the start."""
    threads = threads or [1] * world
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    init_file = tmp_path / f"init-{backend}-{world}"
    ranks = [
        context.Process(
            target=_rank_main, args=(r, world, backend, str(init_file), scenarios, results, threads[r]), daemon=True
        )
        for r in range(world)
    ]
    for process in ranks:
        process.start()
    answers = {}
    deadline = time.monotonic() + timeout
    try:
        for _ in range(world):
            rank, out = results.get(timeout=max(0.0, deadline - time.monotonic()))
            assert "error" not in out, f"rank {rank} failed:\n{out['error']}"
            answers[rank] = out
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(world)) - set(answers))} gave no answer within {timeout} s")
    finally:
        for process in ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [answers[r] for r in range(world)]


def z_scores(projections: np.ndarray) -> np.ndarray:
    """Per direction: the mean error over the steps divided by its estimated standard error."""
    steps = projections.shape[0]
    return projections.mean(axis=0) / (projections.std(axis=0, ddof=1) / math.sqrt(steps))


BACKENDS = [
    pytest.param("gloo", id="gloo"),
    pytest.param(
        "nccl",
        id="nccl",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and dist.is_nccl_available()), reason="NCCL needs CUDA GPUs: none here"
        ),
    ),
]


def _need_gpus(backend, world):
    if backend == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"NCCL with {world} ranks needs {world} GPUs, {torch.cuda.device_count()} here")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_hook_trains_like_allreduce_unbiased_and_identical_on_every_rank(world, backend, tmp_path):
    _need_gpus(backend, world)
    ranks = run_ranks(world, ["train", "unbiased", "start_step", "feedback", "regroup"], tmp_path, backend)

    # Training: ATOMO reaches allreduce's test accuracy within 5 points, and the replicas never drift.
    train = [r["train"] for r in ranks]
    for label in ("allreduce", "atomo"):
        assert len({t[label]["params"] for t in train}) == 1, f"{label}: parameters differ across ranks"
        assert len({tuple(t[label]["grads"]) for t in train}) == 1, f"{label}: gradients differ across ranks"
    reference, atomo = train[0]["allreduce"], train[0]["atomo"]
    assert reference["test_accuracy"] > 0.85, reference
    assert atomo["test_accuracy"] > reference["test_accuracy"] - 0.05, (atomo, reference)
    assert atomo["bytes_per_step"] < 0.3 * 4 * (64 * 32 + 32 + 32 * 10 + 10)

    # Unbiasedness: the hooked average is bitwise identical on every rank at every step, and its mean error
    # over the steps is within Z_LIMIT standard errors of zero in every direction; the unscaled codec's is not.
    for label in ("atomo", "unscaled"):
        digests = [r["unbiased"][label]["digests"] for r in ranks]
        assert all(d == digests[0] for d in digests), f"{label}: the averaged gradient differs across ranks"
        assert len(set(digests[0])) > UNBIASED_STEPS // 2, f"{label}: the samples do not change with the step"
    projections = [np.array(ranks[0]["unbiased"][label]["projections"]) for label in ("atomo", "unscaled")]
    atomo_z, unscaled_z = z_scores(projections[0]), z_scores(projections[1])
    assert np.all(np.abs(atomo_z) < Z_LIMIT), atomo_z
    assert unscaled_z[0] < -Z_LIMIT, unscaled_z  # along the gradient: it sends too little of it

    # start_step: exact allreduce for steps 0..2, ATOMO from step 3, with the bytes counted accordingly.
    start = ranks[0]["start_step"]
    steps = start["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s["distance"] < 1e-6 and s["bytes"] == start["dense_bytes"] for s in steps[:3]), steps
    assert all(s["distance"] > 1e-3 and 0 < s["bytes"] < start["dense_bytes"] / 2 for s in steps[3:]), steps
    assert start["bytes_sent"] == sum(s["bytes"] for s in steps)

    # Error feedback (topk) keeps one memory per layer across the buckets and steps.
    feedback = ranks[0]["feedback"]
    assert len({r["feedback"]["digest"] for r in ranks}) == 1
    assert feedback["buckets"] >= 2 and feedback["with_memory"] == 2, feedback  # the two weight matrices
    assert feedback["residual"] > 0.1 and feedback["invariant_error"] < 1e-5, feedback

    # After DDP regroups its buckets, the old buckets' policies (and their memory) are dropped: at the end of
    # every step the state holds one policy per bucket of that step.
    regroup = ranks[0]["regroup"]
    assert all(s["policies"] == s["buckets"] for s in regroup), regroup
    assert len(regroup[-1]["policies"]) >= 2
    assert regroup[0]["buckets"] != regroup[1]["buckets"], "DDP did not regroup: the test checks nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failure_on_one_rank_raises_the_same_error_on_every_rank(backend, tmp_path):
    """Rank 1's encode raises, or its buffer length is out of bounds: both ranks raise the same RuntimeError
    promptly (no rank is left waiting in a collective), and the group still works afterwards."""
    _need_gpus(backend, 2)
    ranks = run_ranks(2, ["failures"], tmp_path, backend, timeout=60)
    results = [r["failures"] for r in ranks]
    for label in ("raise", "nan", "oversize"):
        errors = [r[label]["error"] for r in results]
        assert errors[0] is not None and errors[0] == errors[1], (label, errors)
        assert all(r[label]["step"] == 0 for r in results), label
    raised = results[0]["raise"]["error"]
    assert raised.startswith("atomo_hook: encoding failed (bucket 0, step 0); rank 1: RuntimeError: linalg.eigh")
    assert "rank 0:" not in raised
    assert [r["raise"]["cause"] for r in results] == [None, "RuntimeError"]  # chained on the failing rank
    nan = results[0]["nan"]["error"]
    assert "encoding failed" in nan and "rank 1: ValueError: topk: the gradient plus residual has non-finite" in nan
    assert [r["nan"]["cause"] for r in results] == [None, "ValueError"]
    oversize = results[0]["oversize"]["error"]
    assert oversize.startswith("atomo_hook: buffer lengths outside [40, ") and "rank 1: " in oversize  # 4 tensors
    assert "rank 0:" not in oversize
    assert results[0]["after"] == results[1]["after"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_hooked_average_is_bitwise_identical_on_every_rank_at_every_step(world, backend, tmp_path):
    """Every codec family, IDENTITY_STEPS steps: the averaged bucket each rank hands DDP has the same bytes on
    every rank at every step, with the ranks on different torch.set_num_threads and the CPU kept busy. Before
    the decode ran on one thread, svd and fourier differed at many steps here (MKL's sgemm and FFT round
    differently with the thread count)."""
    _need_gpus(backend, world)
    threads = [1 + r % 2 for r in range(world)]  # 1, 2, 1: two thread counts in every group
    ranks = run_ranks(world, ["identity"], tmp_path, backend, timeout=600, threads=threads)
    differ = {}
    for name in IDENTITY_CODECS:
        runs = [r["identity"][name] for r in ranks]
        assert len(runs[0]) >= IDENTITY_STEPS, (name, len(runs[0]))  # one entry per bucket and step
        assert all([(s, b) for s, b, _ in run] == [(s, b) for s, b, _ in runs[0]] for run in runs), name
        assert len({digest for _, _, digest in runs[0]}) > len(runs[0]) // 2, f"{name}: the buckets do not change"
        steps = [(s, b) for i, (s, b, digest) in enumerate(runs[0]) if any(run[i][2] != digest for run in runs)]
        if steps:
            differ[name] = f"{len(steps)} of {len(runs[0])} (step, bucket), first {steps[:3]}"
    assert not differ, f"the averaged bucket differs across ranks: {differ}"


def test_parse_refuses_hostile_indices():
    """The byte-buffer index of step 3, parsed directly: lengths that would wrap a uint64 sum, overrun or
    under-fill the buffer, or a wrong count, raise WireFormatError; a good index round-trips."""
    messages = [make_codec("svd", budget=1).encode(torch.randn(4, 3)), make_codec("dense").encode(torch.ones(3))]
    lengths = [len(m) for m in messages]
    good = _serialize(messages, lengths, 8 * 3 + sum(lengths) + 5)
    parsed = _parse(good, 8 * 3 + sum(lengths), 2, 0)
    assert [bytes(p) for p in parsed] == [bytes(m) for m in messages]

    def hostile(index, nbytes, size=None):
        data = torch.zeros(size or max(nbytes, 8 * len(index)), dtype=torch.uint8)
        data[: 8 * len(index)] = torch.from_numpy(np.array(index, dtype="<u8").view(np.uint8))
        return data, nbytes

    cases = [
        (hostile([2, 2**64 - 5, 15], 34), "gives message 0 18446744073709551611 bytes at offset 24"),  # wraps
        (hostile([2, 5, 2**64 - 1], 34), "past the end"),
        (hostile([2, 11, 0], 34), "past the end"),  # overruns by one byte
        (hostile([2, 5, 4], 34), "describes 33 bytes, its buffer has 34"),  # under-fills
        (hostile([3, 5, 5], 34), "rank 0 sent 3 messages for a bucket of 2 tensors"),
        (hostile([2, 5, 5], 20), "cannot index 2 messages"),
        (hostile([2, 5, 5], 34, size=30), "does not fit its 30-byte buffer"),
        (hostile([2, 5, 5], -1, size=30), "does not fit"),
    ]
    for (data, nbytes), error in cases:
        with pytest.raises(WireFormatError, match=error):
            _parse(data, nbytes, 2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_configurations_fail_on_every_rank(backend, tmp_path):
    _need_gpus(backend, 3)
    ranks = run_ranks(3, ["mismatch"], tmp_path, backend)
    for rank, result in enumerate(ranks):
        budget_error, start_error = result["mismatch"]
        assert budget_error is not None and start_error is not None, f"rank {rank} raised nothing"
        assert "the ranks' configurations differ (bucket 0)" in budget_error
        assert "policy differs: rank 0: SpectralCodec(2.0" in budget_error
        assert "| rank 2: SpectralCodec(3.0" in budget_error
        assert "start_step differs: rank 0: 0 | rank 1: 0 | rank 2: 2" in start_error
        assert "policy" not in start_error


@pytest.mark.parametrize("backend", BACKENDS)
def test_world_of_one(backend, tmp_path):
    _need_gpus(backend, 1)
    (result,) = run_ranks(1, ["start_step"], tmp_path, backend)
    steps = result["start_step"]["steps"]
    assert all(s["distance"] < 1e-6 for s in steps[:3]) and all(s["distance"] > 1e-3 for s in steps[3:]), steps


def test_state_refuses_bad_arguments():
    with pytest.raises(TypeError, match="expected a Codec or a LayerPolicy, got str"):
        AtomoHookState("svd")
    with pytest.raises(ValueError, match="start_step must be a non-negative integer, got -1"):
        AtomoHookState(make_codec("svd", budget=1), start_step=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        AtomoHookState(make_codec("svd", budget=1), seed=1.5)
