"""The shared SGD step (services.common.replica) in one process: the PS's path (gradients accumulated as they
arrive) and the workers' path (the forwarded messages replayed) give bitwise-equal models, BatchNorm
statistics are averaged, and a gradient that decodes to non-finite values is left out of the sums."""

import torch
from torch.nn import functional as F

from services.common.replica import GradientError, Replica
from services.common.spec import RunSpec
from services.worker.worker import DENSE_POLICY, gradient_policy

CPU = torch.device("cpu")


def gradient_frames(replica: Replica, policy, seed: int) -> list[memoryview]:
    """One worker's step on a random batch: forward (train mode: BatchNorm statistics move), backward, encode."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 3, 32, 32, generator=generator), torch.randint(10, (2,), generator=generator)
    replica.model.train()
    replica.model.zero_grad(set_to_none=True)
    F.cross_entropy(replica.model(x), y).backward()
    messages = policy.encode([p.grad for p in replica.params], generator)
    messages += DENSE_POLICY.encode([b.detach() for b in replica.buffers])
    return [memoryview(bytes(m)) for m in messages]


def test_workers_replaying_the_aggregated_messages_stay_bitwise_equal_to_the_ps():
    torch.set_num_threads(1)
    spec = RunSpec(model="resnet18", workers=2, batch_size=4, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch.manual_seed(0)
    ps = Replica(spec, 10, 3, CPU)
    state, has_momentum = ps.state_messages(with_momentum=True)
    workers = [Replica(spec, 10, 3, CPU) for _ in range(2)]
    for w in workers:
        w.load_state_messages([memoryview(bytes(m)) for m in state], has_momentum)
        assert w.digest() == ps.digest()
    policy = gradient_policy(spec)
    for step in range(2):
        gradients = [gradient_frames(w, policy, seed=10 * step + i) for i, w in enumerate(workers)]
        running_means = torch.stack([w.model.bn1.running_mean.clone() for w in workers])
        ps.begin_step()
        for frames in gradients:  # as the PS does when each gradient arrives
            ps.accumulate(ps.parse_gradient(frames))
        assert ps.sums_finite()
        ps.finish_step(lr=0.1)
        for w in workers:  # as each worker does with the UPDATE's forwarded frames
            w.sgd_step(gradients, lr=0.1)
        assert all(w.digest() == ps.digest() for w in workers)
        torch.testing.assert_close(ps.model.bn1.running_mean, running_means.mean(0), rtol=1e-6, atol=1e-7)
    assert ps.momentum_buffers() is not None
    # A joining worker gets the state with the momentum and then follows the same updates.
    state, has_momentum = ps.state_messages(with_momentum=True)
    late = Replica(spec, 10, 3, CPU)
    late.load_state_messages([memoryview(bytes(m)) for m in state], has_momentum)
    gradients = [gradient_frames(w, policy, seed=99 + i) for i, w in enumerate(workers)]
    for r in (ps, late, *workers):
        r.sgd_step(gradients, lr=0.05)
    assert late.digest() == ps.digest() == workers[0].digest()


def test_a_gradient_that_decodes_to_infinity_is_found_and_left_out():
    spec = RunSpec(model="mlp", workers=3, batch_size=3)
    torch.manual_seed(0)
    ps = Replica(spec, 10, 1, CPU)
    reference = Replica(spec, 10, 1, CPU)
    reference.load_state_messages([memoryview(bytes(m)) for m in ps.state_messages(with_momentum=False)[0]], False)
    shapes = [p.shape for p in ps.params]

    def gradient(value: float):
        return [memoryview(bytes(m)) for m in DENSE_POLICY.encode([torch.full(s, value) for s in shapes])]

    # Each payload is finite; the second and third together overflow float32.
    gradients = [gradient(1.0), gradient(3e38), gradient(3e38)]
    parsed = [ps.parse_gradient(g) for g in gradients]
    ps.begin_step()
    for messages in parsed:
        ps.accumulate(messages)
    assert not ps.sums_finite()
    assert ps.rebuild(parsed) == [2]
    assert ps.sums_finite()
    ps.finish_step(lr=1e-40)
    reference.sgd_step(gradients[:2], lr=1e-40)
    assert ps.digest() == reference.digest()
    nan = [memoryview(bytes(m)) for m in DENSE_POLICY.encode([torch.full(s, float("nan")) for s in shapes])]
    try:
        ps.parse_gradient(nan)
    except GradientError as exc:
        assert exc.reason == "non_finite"
    else:
        raise AssertionError("a NaN gradient passed validation")
