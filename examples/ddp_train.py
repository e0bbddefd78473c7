"""Train LeNet-5 on the digits set with DistributedDataParallel and the ATOMO communication hook.

    torchrun --nproc_per_node 2 examples/ddp_train.py --codec svd --budget 3
    torchrun --nproc_per_node 2 examples/ddp_train.py --codec powersgd --rank 2   # a biased baseline
    torchrun --nproc_per_node 2 examples/ddp_train.py --codec allreduce      # DDP's own allreduce

On GPUs (one per process) it uses NCCL, otherwise gloo on the CPU. Each rank trains on its own shard of the
1,497 training images; every --log-every steps rank 0 prints the mean training loss, and at the end the test
accuracy and the bytes rank 0 sent per step: with a codec, the mean length of its encoded messages over the
compressed steps (those from --start-step on; the allreduce steps before them are not counted); with
allreduce, its dense gradients.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from atomo_core import make_codec
from atomo_core.data import BatchStream, load_dataset
from atomo_core.ddp import AtomoHookState, atomo_hook
from atomo_core.models import LeNet5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", default="svd", help="a codec name (svd, qsgd, ...) or allreduce")
    parser.add_argument("--budget", type=float, help="the codec's sparsity budget s (ATOMO codecs)")
    parser.add_argument("--bits", type=int, help="bits per entry (qsgd)")
    parser.add_argument("--rank", type=int, help="the rank r of P Q^T (powersgd)")
    parser.add_argument("--start-step", type=int, default=0, help="steps of plain allreduce first")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("start it with torchrun, e.g. torchrun --nproc_per_node 2 examples/ddp_train.py")
    codec = None
    if args.codec != "allreduce":
        options = (("budget", args.budget), ("bits", args.bits), ("rank", args.rank))
        params = {k: v for k, v in options if v is not None}
        try:
            codec = make_codec(args.codec, **params)
        except ValueError as exc:  # an unknown codec or a bad parameter: say so before any process group exists
            parser.error(str(exc))

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    train, test, info = load_dataset("digits")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = LeNet5(num_classes=info.num_classes, in_channels=info.in_channels).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    state = None
    if codec is not None:
        state = AtomoHookState(codec, seed=args.seed, start_step=args.start_step)
        ddp.register_comm_hook(state, atomo_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batches = BatchStream(train.to(device), rank, world, args.batch, seed=args.seed)

    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}, {device.type}), codec {args.codec}, {args.steps} steps")
    start, running = time.perf_counter(), 0.0
    allreduce_bytes = 0  # the hook's bytes before its first compressed step
    for step in range(1, args.steps + 1):
        if state is not None and state.step == args.start_step:
            allreduce_bytes = state.bytes_sent
        x, y = next(batches)
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        optimizer.step()
        running += float(loss.detach())
        if rank == 0 and step % args.log_every == 0:
            print(f"step {step:5d}  loss {running / args.log_every:.4f}")
            running = 0.0
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        logits = model(test.x.to(device))
        accuracy = float((logits.argmax(1) == test.y.to(device)).float().mean())
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    compressed_steps = state.step - args.start_step if state is not None else 0
    if rank == 0:
        print(f"test accuracy {accuracy:.4f}  ({elapsed:.1f} s, {1e3 * elapsed / args.steps:.1f} ms/step)")
        if state is None:
            print(f"bytes sent per step by rank 0: {dense:,} (dense allreduce)")
        elif compressed_steps <= 0:
            print(f"no compressed step: --start-step {args.start_step} >= --steps {args.steps}")
        else:
            sent = (state.bytes_sent - allreduce_bytes) / compressed_steps
            print(
                f"bytes sent per compressed step by rank 0: {sent:,.0f} over {compressed_steps} steps "
                f"(dense {dense:,}, {dense / sent:.1f}x less)"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
