"""ATOMO as a DistributedDataParallel communication hook: unbiased sparsified gradients over torch.distributed.

    state = AtomoHookState(make_codec("svd", budget=3), seed=0)
    ddp_model.register_comm_hook(state, atomo_hook)

DDP hands the hook one bucket (a flat buffer holding several parameters' gradients) at a time and expects
a future of the averaged buffer. Instead of allreducing it, each rank encodes every gradient of the bucket
with the per-layer policy (Section 2, eq. (2): an unbiased estimate), and the ranks all-gather the messages.
Every rank then decodes all ranks' messages in rank order and averages them: the same bytes through the
same operations, so the averaged gradient is bitwise identical on every rank (the replicas never drift),
and it is an unbiased estimate of the allreduce average (a mean of independent unbiased estimates).

Per bucket and step, one rank's part of the exchange is:

1. Encode each gradient of the bucket (LayerPolicy.encode) with a generator drawn from
   (seed, rank, step, bucket index): the samples differ across ranks, steps and buckets and are
   reproducible from `seed`.
2. All-gather a small fixed-size block (`_META_WORDS` int64): this rank's buffer length, the step,
   start_step, the bucket's tensor count, element count and a hash of its shapes, and the policy's
   description. Every rank compares the blocks, so a configuration that differs across ranks fails on
   every rank with the same RuntimeError naming what differs, instead of a hang or a wrong sum. This
   exchange is synchronous (the hook waits for it): issuing the second collective from a future's callback
   could order the collectives of different buckets differently on different ranks. It costs one small
   round trip per bucket (`state.sync_seconds`).
3. All-gather the byte buffers, each padded to the largest rank's length. A rank's buffer is an index
   (uint64: the message count, then each message's length) followed by the messages' wire bytes
   (atomo_core.wire), written once into the send buffer from the messages' own buffers.
4. When the gather completes (a future callback, no collective in it): parse every rank's messages,
   its own included, sum their decoded estimates into the bucket's buffer in rank order, divide by the
   world size, all on one intra-op thread (`one_thread`: multi-threaded CPU kernels round differently with
   the thread count, which differs across ranks and across the threads that run the callback).

A failure on one rank never leaves the others waiting. An encode that raises on one rank only (an
eigensolver that did not converge, a non-finite gradient given to a feedback codec) does not leave the hook
there: that rank still takes part in step 2, with a buffer length of -1 and the exception's type and text
(truncated to `_DESCRIPTION_BYTES` UTF-8 bytes) in place of the policy's description, and then every rank
raises the same RuntimeError naming each failing rank, the bucket, the step and the error (on the failing
rank chained to the original exception). Nothing is sent for that bucket and the step is not counted; the
policy's error-feedback memory is left as it was (LayerPolicy.encode keeps it only when every layer encoded).
The buffer lengths are checked before anything is allocated from them: each must lie between the index
alone, 8 (1 + tensors) bytes, and the index plus every tensor's dense message (`dense_nbytes`: the policy
never sends more), or every rank raises the same RuntimeError. A received index whose lengths do not add up
to the rank's buffer length, or overrun it, raises WireFormatError (as a malformed message does, on every
rank, since every rank parses the same bytes).

Error feedback: the biased baselines (topk, powersgd; the hook's average is then biased too) keep a memory
per layer in the policy. The state keeps one copy of the policy per bucket (keyed by its parameters), so each
layer keeps its own memory. DDP regroups its buckets once, at the start of the second step: a layer whose
bucket changed starts again from zero memory, and at the end of every step the copies no bucket of that step
used (the old buckets', with their memory) are dropped, so `state.policies` holds one copy per bucket in use.
With start_step >= 1 nothing is lost (the allreduce steps keep no memory).

The first `start_step` steps are a plain allreduce (as PowerSGD's `start_powerSGD_iter`). At step 0 the
fingerprint of step 2 is exchanged whatever the mode, so a start_step that differs across ranks fails there.

gloo (CPU tensors) and NCCL (CUDA tensors): with NCCL the exchanged buffers are uint8 CUDA tensors; the
gathered bytes are copied to the host once to be parsed, and each message is added into the bucket with its
codec's `decode_add_`: svd, topk and powersgd copy their factors or values to the bucket's device and add
them there, and so do qsgd, terngrad and lq with fixed-width payloads (unpacked on the device); the Elias-coded
quantizers and entrywise and fourier decode the estimate on the host and copy it to the device to add it.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations against the real objects.
import contextlib
import dataclasses
import hashlib
import math
import time

import numpy as np
import torch
import torch.distributed as dist

from atomo_core.codecs import Codec
from atomo_core.policy import LayerPolicy, decode_add_, dense_nbytes
from atomo_core.wire import DEFAULT_LIMITS, Message, WireFormatError, WireLimits

_DESCRIPTION_BYTES = 192  # the policy's description in the fingerprint, truncated to this many UTF-8 bytes
_FIELDS = ("buffer bytes", "step", "start_step", "bucket tensors", "bucket elements", "bucket shapes")
_META_WORDS = len(_FIELDS) + _DESCRIPTION_BYTES // 8


class AtomoHookState:
    """What `atomo_hook` keeps between calls.

    codec_or_policy: a `Codec` (wrapped as `LayerPolicy(codec)`: tensors of >= 2 dimensions by the codec,
        biases and other vectors dense) or a `LayerPolicy`.
    process_group: the group to communicate in (default: the default group).
    seed: the sampling of rank r at step t in bucket b draws from a generator seeded from (seed, r, t, b).
    start_step: the number of steps of plain allreduce before ATOMO starts (default 0).

    Counters, for this rank:
    step: completed steps (a step ends with the hook call of DDP's last bucket).
    bytes_sent: cumulative bytes this rank put on the wire for its gradients: the exact length of its
        encoded messages at ATOMO steps; at allreduce steps the size of the buckets' buffers (numel times
        the element size: what this rank contributes, not the ring allreduce's traffic). The 8-byte index
        entries per message, the padding to the largest rank's buffer and the fingerprint block are not
        counted.
    last_step_bytes: the same, for the last completed step only.
    encode_seconds, sync_seconds: cumulative time spent encoding, and waiting in the synchronous
        fingerprint exchange (step 2 of the module docstring; it includes waiting for slower ranks).
    policies: the copy of `policy` used for each bucket, keyed by the data pointers of its parameters
        (where a biased codec's error-feedback memory lives); at the end of each step the copies that no
        bucket of that step used are dropped.
    """

    def __init__(
        self,
        codec_or_policy: Codec | LayerPolicy,
        *,
        process_group: dist.ProcessGroup | None = None,
        seed: int = 0,
        start_step: int = 0,
    ):
        if isinstance(codec_or_policy, Codec):
            codec_or_policy = LayerPolicy(codec_or_policy)
        if not isinstance(codec_or_policy, LayerPolicy):
            raise TypeError(f"expected a Codec or a LayerPolicy, got {type(codec_or_policy).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
        self.policy = codec_or_policy
        self.process_group = process_group
        self.seed = seed
        self.start_step = start_step
        self.limits: WireLimits = DEFAULT_LIMITS
        self.step = 0
        self.bytes_sent = 0
        self.last_step_bytes = 0
        self.encode_seconds = 0.0
        self.sync_seconds = 0.0
        self._step_bytes = 0
        self.policies: dict[tuple[int, ...], LayerPolicy] = {}
        self._used: set[tuple[int, ...]] = set()  # the keys of `policies` used in the current step
        self._description = (
            f"{self.policy.codec!r}, vectors {self.policy.vector_codec!r}, "
            f"min rate {self.policy.min_compression_rate:g}"
        )

    def _bucket_policy(self, bucket: dist.GradBucket) -> LayerPolicy:
        """The policy of this bucket's parameters: a copy of `policy` per bucket, so that the error-feedback
        memory of biased codecs (kept by the policy per tensor index) stays with its own layer."""
        key = tuple(p.data_ptr() for p in bucket.parameters())
        if key not in self.policies:
            self.policies[key] = dataclasses.replace(self.policy)
        self._used.add(key)
        return self.policies[key]

    def _end_of_step_call(self, bucket: dist.GradBucket, nbytes: int) -> None:
        self._step_bytes += nbytes
        self.bytes_sent += nbytes
        if bucket.is_last():
            self.last_step_bytes, self._step_bytes = self._step_bytes, 0
            self.step += 1
            # Free the memory of buckets DDP no longer uses (it regroups them after the first step).
            self.policies = {key: policy for key, policy in self.policies.items() if key in self._used}
            self._used = set()


def sampling_generator(seed: int, rank: int, step: int, bucket: int, device: torch.device) -> torch.Generator:
    """The generator of one rank's sampling in one bucket at one step, seeded from (seed, rank, step, bucket)."""
    state = np.random.SeedSequence([seed, rank, step, bucket]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def atomo_hook(state: AtomoHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients across ranks with ATOMO; see the module docstring for the steps."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    buffer = bucket.buffer()
    step = state.step
    if step < state.start_step:
        if step == 0:
            _check_fingerprints(state, bucket, group, world, 0)
        state._end_of_step_call(bucket, buffer.numel() * buffer.element_size())
        work = dist.all_reduce(buffer.div_(world), group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    # 1. Encode every gradient of the bucket with this rank's (seed, rank, step, bucket) generator. An
    # exception is not raised here: it would leave the other ranks waiting in step 2; it is sent instead.
    start = time.perf_counter()
    gradients = bucket.gradients()
    outs = _views(buffer, gradients)
    generator = sampling_generator(state.seed, rank, step, bucket.index(), buffer.device)
    error = None
    try:
        messages = state._bucket_policy(bucket).encode([g.detach() for g in gradients], generator)
        lengths = [len(m) for m in messages]
        nbytes = 8 * (1 + len(lengths)) + sum(lengths)
    except Exception as exc:  # raised again on every rank after the exchange of step 2
        error, messages, lengths, nbytes = exc, [], [], -1
    state.encode_seconds += time.perf_counter() - start

    # 2. The buffer lengths and the configuration fingerprints, synchronously.
    sizes = _check_fingerprints(state, bucket, group, world, nbytes, error=error, check_sizes=True)
    state._end_of_step_call(bucket, sum(lengths))

    # 3. All-gather the byte buffers, padded to the largest.
    device = _collective_device(group, buffer)
    send = _serialize(messages, lengths, max(sizes))
    if device.type != "cpu":
        send = send.to(device)
    received = [torch.empty_like(send) for _ in range(world)]
    work = dist.all_gather(received, send, group=group, async_op=True)

    # 4. Decode every rank's messages in rank order, sum them into the bucket's buffer, divide by the world,
    # on one intra-op thread whichever thread runs this callback (bitwise identity; see `one_thread`).
    def decode(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()
        gathered = list(torch.stack(received).cpu()) if device.type != "cpu" else received
        with one_thread():
            buffer.zero_()
            for r in range(world):
                decode_add_(_parse(gathered[r], sizes[r], len(outs), r), outs, limits=state.limits)
            return buffer.div_(world)

    return work.get_future().then(decode)


@contextlib.contextmanager
def one_thread():
    """Run the enclosed torch operations on one intra-op thread, in whichever thread enters this.

    Why: the CPU kernels the decoders use round differently with the number of threads they split the work
    over. MKL's sgemm (the spectral and PowerSGD products) and its FFT (the Fourier synthesis) gave different
    bits for the same inputs on 1 and 2 threads, and a rank's thread count is not even fixed: the decode
    runs in a future callback, on the thread that called the hook when the gather had already finished, else
    on one of gloo's threads, and each thread keeps its own OpenMP and MKL thread counts. Ranks that
    decoded the same bytes then got averages that differed in their last bits at about one step in six
    (two ranks at 1 and 2 threads, LeNet-5, svd). On one thread every kernel runs the same sequence of
    operations on every rank, so the same bytes give the same bits (on the same CPU type and torch build).

    torch.set_num_threads sets the calling thread's OpenMP and MKL counts (and the count new threads start
    from); the thread's own count is restored on exit.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _views(buffer: torch.Tensor, gradients: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's place in the bucket's flat buffer (DDP lays them out in order, one after another)."""
    sizes = [g.numel() for g in gradients]
    if sum(sizes) != buffer.numel():
        raise RuntimeError(
            f"atomo_hook: the bucket's gradients have {sum(sizes)} elements, its buffer {buffer.numel()}"
        )
    return [v.view(g.shape) for v, g in zip(buffer.split(sizes), gradients, strict=True)]


def _collective_device(group, buffer: torch.Tensor) -> torch.device:
    """Where the exchanged tensors live: the bucket's GPU under NCCL, the host otherwise."""
    return buffer.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _serialize(messages: list[Message], lengths: list[int], padded: int) -> torch.Tensor:
    """The index (count, lengths as uint64) then each message's bytes, in a zero-padded uint8 tensor."""
    out = torch.zeros(padded, dtype=torch.uint8)
    raw = out.numpy()
    raw[: 8 * (1 + len(lengths))] = np.frombuffer(np.array([len(lengths), *lengths], dtype="<u8").tobytes(), np.uint8)
    offset = 8 * (1 + len(lengths))
    for msg in messages:
        for part in msg.buffers():
            n = len(part)
            raw[offset : offset + n] = np.frombuffer(part, np.uint8)
            offset += n
    return out


def _parse(data: torch.Tensor, nbytes: int, count: int, rank: int) -> list[memoryview]:
    """Rank `rank`'s messages from its gathered buffer (its first `nbytes` bytes); WireFormatError if malformed.

    The index's lengths are checked one by one, in Python integers, against what is left of the buffer, so a
    huge length (one that would wrap a uint64 sum) or an index that overruns or under-fills the buffer is
    refused before any slice is taken."""
    if not 0 <= nbytes <= data.numel():
        raise WireFormatError(f"rank {rank}'s length of {nbytes} bytes does not fit its {data.numel()}-byte buffer")
    view = memoryview(data.numpy()).cast("B")[:nbytes]
    header = 8 * (1 + count)
    if nbytes < header:
        raise WireFormatError(f"rank {rank}'s buffer of {nbytes} bytes cannot index {count} messages")
    index = [int(n) for n in np.frombuffer(view[:header], dtype="<u8")]
    if index[0] != count:
        raise WireFormatError(f"rank {rank} sent {index[0]} messages for a bucket of {count} tensors")
    messages, offset = [], header
    for i, length in enumerate(index[1:]):
        if length > nbytes - offset:
            raise WireFormatError(
                f"rank {rank}'s index gives message {i} {length} bytes at offset {offset}: past the end of its "
                f"{nbytes}-byte buffer"
            )
        messages.append(view[offset : offset + length])
        offset += length
    if offset != nbytes:
        raise WireFormatError(f"rank {rank}'s index describes {offset} bytes, its buffer has {nbytes}")
    return messages


def _fingerprint(state: AtomoHookState, bucket: dist.GradBucket, nbytes: int, error: str | None) -> torch.Tensor:
    """This rank's block of the step-2 exchange: the fields of `_FIELDS`, then the policy's description (the
    error's text instead when this rank's encode failed, with nbytes -1)."""
    shapes = [tuple(p.shape) for p in bucket.parameters()]
    digest = hashlib.blake2b(repr(shapes).encode(), digest_size=8).digest()
    text = (state._description if error is None else error).encode()
    text = text[:_DESCRIPTION_BYTES].ljust(_DESCRIPTION_BYTES, b"\0")
    fields = [nbytes, state.step, state.start_step, len(shapes), sum(math.prod(s) for s in shapes)]
    block = np.concatenate(
        [np.array(fields, dtype=np.int64), np.frombuffer(digest, np.int64), np.frombuffer(text, np.int64)]
    )
    return torch.from_numpy(block)


def _check_fingerprints(
    state: AtomoHookState,
    bucket,
    group,
    world: int,
    nbytes: int,
    *,
    error: BaseException | None = None,
    check_sizes: bool = False,
) -> list[int]:
    """All-gather the fingerprints (waiting for them); every rank's buffer length, or the same RuntimeError on
    every rank: naming the ranks whose encode failed (nbytes -1 and `error` here), else what differs, else
    (with `check_sizes`) the buffer lengths outside [index, index + dense bytes of the bucket's tensors]."""
    start = time.perf_counter()
    text = None if error is None else f"{type(error).__name__}: {error}"
    mine = _fingerprint(state, bucket, nbytes, text).to(_collective_device(group, bucket.buffer()))
    blocks = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(blocks, mine, group=group)
    table = torch.stack(blocks).cpu().numpy()
    state.sync_seconds += time.perf_counter() - start
    described = [bytes(row[len(_FIELDS) :].tobytes()).rstrip(b"\0").decode(errors="replace") for row in table]
    failed = [r for r in range(world) if table[r, 0] < 0]
    if failed:
        raise RuntimeError(
            f"atomo_hook: encoding failed (bucket {bucket.index()}, step {int(table[failed[0], 1])}); "
            + "; ".join(f"rank {r}: {described[r]}" for r in failed)
        ) from error
    columns = [*(table[:, i].tolist() for i in range(1, len(_FIELDS))), described]
    names = [*_FIELDS[1:], "policy"]
    differ = [
        f"{name} differs: " + " | ".join(f"rank {r}: {value}" for r, value in enumerate(column))
        for name, column in zip(names, columns, strict=True)
        if len(set(column)) > 1
    ]
    if differ:
        raise RuntimeError(
            f"atomo_hook: the ranks' configurations differ (bucket {bucket.index()}); " + "; ".join(differ)
        )
    sizes = table[:, 0].tolist()
    if check_sizes:
        shapes = [tuple(p.shape) for p in bucket.parameters()]
        low = 8 * (1 + len(shapes))
        high = low + sum(dense_nbytes(shape) for shape in shapes)
        wrong = [f"rank {r}: {size}" for r, size in enumerate(sizes) if not low <= size <= high]
        if wrong:
            raise RuntimeError(
                f"atomo_hook: buffer lengths outside [{low}, {high}] bytes (the index, plus at most every tensor "
                f"sent dense) in bucket {bucket.index()}: " + ", ".join(wrong)
            )
    return sizes
