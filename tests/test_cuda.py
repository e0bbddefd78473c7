"""The GPU paths: codecs on CUDA tensors, the DDP hook over NCCL, the PS and workers on `cuda`.

Every test here needs CUDA and is skipped without it (the development machine has no GPU);
bench/gpu.sh runs this file, with the NCCL cases of tests/test_ddp.py, where one is.
"""

import math

import pytest
import torch
from test_ddp import run_ranks
from test_quantizers import assert_unbiased, mixed_vector

import atomo_core
from atomo_core import make_codec
from atomo_core.codecs import codec_for
from atomo_core.wire import CODEC_IDS, decode_message
from services.common.launch import LocalCluster

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none here")

# One configuration per built-in codec; a codec added without one fails test_every_codec_is_covered.
CODEC_PARAMS = {
    "dense": {},
    "entrywise": {"budget": 40},
    "svd": {"budget": 2},
    "fourier": {"budget": 40},
    "qsgd": {"bits": 4},
    "terngrad": {},
    "lq": {"q": 2.0},
    "topk": {"budget": 40},
    "powersgd": {"rank": 2},
}
RUN_TIMEOUT_S = 180


def test_every_codec_is_covered():
    assert sorted(CODEC_PARAMS) == sorted(CODEC_IDS)  # the built-in codecs, each with its wire id


@pytest.mark.parametrize("name", sorted(CODEC_PARAMS))
def test_codec_encodes_cuda_tensors_and_decodes_onto_the_outputs_device(name):
    codec = make_codec(name, **CODEC_PARAMS[name])
    x = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)).cuda()
    msg = codec.encode(x, torch.Generator(device="cuda").manual_seed(1))
    # The sections as encoded, on the GPU: the quantizers (qsgd, terngrad, lq) pack their fixed-width payloads
    # there by default (coding "auto"), and the in-memory message decodes there too.
    assert all(section.device == x.device for section in msg.sections)
    from_message = atomo_core.decode(msg)
    assert from_message.device.type == "cuda"
    from_bytes = atomo_core.decode(bytes(msg))  # the wire form, parsed on the host
    assert from_bytes.device.type == "cpu"
    torch.testing.assert_close(from_message.cpu(), from_bytes)
    out = torch.ones_like(x)  # decode_add_ onto the output's device, as the PS and the DDP hook do
    codec_for(decode_message(bytes(msg))).decode_add_(bytes(msg), out, alpha=0.5)
    assert out.device == x.device
    torch.testing.assert_close(out.cpu(), 1 + 0.5 * from_bytes)
    if name == "dense":
        torch.testing.assert_close(from_bytes, x.cpu(), rtol=0, atol=0)


def test_svd_on_cuda_is_unbiased():
    """The mean of 2,000 GPU-encoded estimates is within 5 standard errors of the matrix, entry by entry."""
    codec = make_codec("svd", budget=2)
    x = torch.randn(12, 20, generator=torch.Generator().manual_seed(2)).cuda()
    generator = torch.Generator(device="cuda").manual_seed(3)
    samples = torch.stack([atomo_core.decode(codec.encode(x, generator)) for _ in range(2000)]).double()
    standard_error = samples.std(dim=0) / 2000**0.5
    assert ((samples.mean(dim=0) - x.double()).abs() <= 5 * standard_error + 1e-6).all()


def test_warm_svd_on_cuda_is_exact_in_strict_float32_and_unbiased():
    """The warm route's matmuls run in IEEE float32 even with TF32 switched on (restored afterwards): every atom
    kept rebuilds the matrix to float32 rounding; from a fixed stale basis, 2,000 estimates average to it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 8, generator=g) @ torch.randn(8, 120, generator=g) + 0.1 * torch.randn(40, 120, generator=g)
    x = x.cuda()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        everything = make_codec("svd", budget=10_000, basis="warm", rank=8)
        msg, basis = everything.encode_with_state(x, None, torch.Generator(device="cuda").manual_seed(0))
        assert torch.backends.cuda.matmul.allow_tf32  # restored
        assert basis.device.type == "cuda" and basis.shape == (40, 8)
        error = (atomo_core.decode(bytes(msg)) - x.cpu()).abs().max() / x.abs().max().cpu()
        assert float(error) < 1e-5  # TF32 (10-bit mantissa) would leave about 1e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    codec = make_codec("svd", budget=3, basis="warm", rank=8)
    generator = torch.Generator(device="cuda").manual_seed(3)
    samples = torch.stack(
        [atomo_core.decode(codec.encode_with_state(x, basis.flip(1), generator)[0]) for _ in range(2000)]
    ).double()
    standard_error = samples.std(dim=0) / 2000**0.5
    assert ((samples.mean(dim=0) - x.double()).abs() <= 5 * standard_error + 1e-6).all()


def test_policy_state_of_cuda_layers_survives_a_checkpoint():
    """Warm bases kept on the GPU, saved as CPU tensors, restored: the next step's messages are identical."""
    from atomo_core import LayerPolicy

    g = torch.Generator().manual_seed(5)
    steps = [[torch.randn(96, 64, 3, 3, generator=g).cuda(), torch.randn(96, generator=g).cuda()] for _ in range(3)]
    policy = LayerPolicy(make_codec("svd", budget=3, basis="warm", rank=16))
    for grads in steps[:2]:
        policy.encode(grads, torch.Generator(device="cuda").manual_seed(1))
    assert policy.state(0).device.type == "cuda"
    state = policy.state_dict()
    assert state["layers"][0]["basis"].device.type == "cpu"
    restored = LayerPolicy(policy.codec)
    restored.load_state_dict(state)
    kept = [bytes(m) for m in policy.encode(steps[2], torch.Generator(device="cuda").manual_seed(2))]
    resumed = [bytes(m) for m in restored.encode(steps[2], torch.Generator(device="cuda").manual_seed(2))]
    assert kept == resumed


QUANTIZERS = [
    ("qsgd", {"bits": 1, "bucket_size": 512}),
    ("qsgd", {"bits": 4}),
    ("qsgd", {"bits": 8, "bucket_size": 100}),
    ("lq", {"q": 2.0}),
    ("lq", {"q": math.inf}),
]


@pytest.mark.parametrize(("name", "params"), QUANTIZERS)
def test_quantizers_pack_on_the_gpu_and_match_the_host_coding_bitwise(name, params):
    """On a GPU the default coding is fixed-width, packed there; the same generator state gives the same
    levels as the host's Elias coding, so the estimates are bitwise equal, decoded on either device."""
    x = torch.randn(7, 1000, generator=torch.Generator().manual_seed(4)).cuda() * torch.logspace(-3, 1, 1000).cuda()
    auto = make_codec(name, **params).encode(x, torch.Generator(device="cuda").manual_seed(5))
    assert auto.sections[1].device == x.device and auto.sections[1].tolist()[0] == 0  # FIXED / PACKED
    elias = make_codec(name, **params, coding="elias").encode(x, torch.Generator(device="cuda").manual_seed(5))
    assert all(section.device.type == "cpu" for section in elias.sections)  # the host coding
    on_gpu = atomo_core.decode(auto)
    assert on_gpu.device == x.device
    for wire in (bytes(auto), bytes(elias)):
        assert torch.equal(atomo_core.decode(wire), on_gpu.cpu())
        out = torch.zeros_like(x)
        codec_for(decode_message(wire)).decode_add_(wire, out)
        assert out.device == x.device and torch.equal(out, on_gpu)


def test_terngrad_packs_on_the_gpu():
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(6)).cuda()
    codec = make_codec("terngrad")
    msg = codec.encode(x, torch.Generator(device="cuda").manual_seed(7))
    assert all(section.device == x.device for section in msg.sections)
    on_gpu = codec.decode(msg)
    assert torch.equal(atomo_core.decode(bytes(msg)), on_gpu.cpu())
    assert set(on_gpu.unique().tolist()) <= {-x.abs().max().item(), 0.0, x.abs().max().item()}


@pytest.mark.parametrize("bits", [1, 4])
def test_qsgd_fixed_coding_on_cuda_is_unbiased(bits):
    """The tiled z-test of tests/test_quantizers.py, quantized and decoded on the GPU."""
    x = mixed_vector(64, seed=bits)
    reps = 4000
    codec = make_codec("qsgd", bits=bits, bucket_size=64)
    msg = codec.encode(x.cuda().repeat(reps), torch.Generator(device="cuda").manual_seed(11))
    samples = codec.decode(msg).view(reps, -1).double().cpu().numpy()
    assert_unbiased(samples, x.double().numpy())


def test_ddp_hook_over_nccl(tmp_path):
    """The hook's start_step scenario over NCCL: 1 rank on one GPU, 2 ranks when there are two."""
    world = min(2, torch.cuda.device_count())
    ranks = run_ranks(world, ["start_step"], tmp_path, backend="nccl")
    for result in ranks:
        steps = result["start_step"]["steps"]
        assert all(s["distance"] < 1e-5 for s in steps[:3]) and all(s["distance"] > 1e-3 for s in steps[3:])
        assert [s["distance"] for s in steps] == [s["distance"] for s in ranks[0]["start_step"]["steps"]]


def run_cluster(tmp_path, ps_device: str, worker_device: str, spec_device: str) -> tuple[dict, dict]:
    """A short svd run of the MLP on digits; the run's final state and the cluster's status."""
    cluster = LocalCluster(
        tmp_path, workers=2, threads=1, ps_args=("--device", ps_device), worker_args=("--device", worker_device)
    )
    with cluster:
        spec = {"model": "mlp", "steps": 40, "batch_size": 64, "eval_every": 40, "codec": {"name": "svd"}}
        cluster.client().call("submit", run_id="gpu", spec={**spec, "device": spec_device})
        run = cluster.wait_for_run("gpu", RUN_TIMEOUT_S)
        status = cluster.client().call("status")
    return run, status


def test_ps_and_workers_on_cuda(tmp_path):
    run, status = run_cluster(tmp_path, "cuda", "cuda", "cuda")
    assert run["state"] == "succeeded", run
    assert status["ps"]["device"] == "cuda"
    assert [w["device"] for w in status["workers"]] == ["cuda", "cuda"]


def test_workers_on_cuda_with_the_ps_on_the_cpu(tmp_path):
    run, status = run_cluster(tmp_path, "cpu", "cuda", "auto")
    assert run["state"] == "succeeded", run
    assert status["ps"]["device"] == "cpu"
    assert [w["device"] for w in status["workers"]] == ["cuda", "cuda"]
