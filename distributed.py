"""Several processes, GPUs and machines for grpo.py and bupo.py, with PyTorch's own engine (torch.distributed).

Launched by torchrun, each process (rank) joins the process group torchrun describes in
its environment: NCCL on GPUs, gloo on CPU. Every step is split by whole GRPO groups: a
rank samples, rewards and trains on its share of every mini-batch, so advantages never
need another rank's rewards. Gradients are averaged by DistributedDataParallel or, with
--fsdp, by FSDP2 (`fully_shard` per decoder layer), which also shards the parameters,
gradients and optimizer state. Rollouts and evaluations use the full weights (FSDP
gathers them for the duration). Only rank 0 writes; checkpoints hold full, unsharded
state keyed by parameter name, so a run resumes on any number of ranks. Without
torchrun nothing here starts: one process, no process group, the scripts as they were.

    torchrun --nproc_per_node=2 grpo.py            # 2 CPU processes (gloo) or 2 GPUs (NCCL)
    torchrun --nproc_per_node=8 experiment.py --fsdp ... # a node of 8 GPUs, sharded

README.md, "Scaling out", has the multi-node commands and the memory arithmetic.
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from cli import InputError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on CPU, on rank 0 only


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = None

    @property
    def main(self):
        """Rank 0: the one that logs, plots and saves."""
        return self.rank == 0


def init():
    """Join torchrun's process group (once per process); without torchrun, a world of one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s): "
                               f"use --nproc_per_node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu"))


def close():
    """Leave the process group (all ranks; the barrier lets pending collectives finish first)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_share(order, mini_batch_prompts, rank, world):
    """This rank's prompts of a step, (n / world,), in update order: its 1/world of each mini-batch.

    order: (n,) the step's shuffled prompt indices; mini-batch m is order[m*mb:(m+1)*mb],
    as in one process, and rank r takes its r-th slice, so the ranks together do what
    one process does.
    """
    share = mini_batch_prompts // world
    return order.view(-1, mini_batch_prompts)[:, rank * share:(rank + 1) * share].reshape(-1)  # (n_mb * share,)


# ----------------------------------------------------------------------------- collectives (identity for one process)

def all_sum(values):
    """Sum a list of floats over ranks; a tensor is summed in place on its device (no host sync)."""
    if torch.is_tensor(values):
        if not dist.is_initialized():
            return values
        t = values.to(_comm_device())  # itself where the backend reduces on its device (NCCL on CUDA, gloo on CPU)
        dist.all_reduce(t)
        return t.to(values.device)
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag):
    """True on every rank when it is True on any."""
    return all_sum([float(flag)])[0] > 0


def gather_rows(t):
    """Concatenate a tensor's rows from every rank, in rank order (same shape on each rank)."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t, device=_comm_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(_comm_device()))
    return torch.cat(parts).to(t.device)


def gather_lists(items):
    """Concatenate a picklable list from every rank, in rank order."""
    if not dist.is_initialized():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- the wrapped model

class Wrapped(torch.nn.Module):
    """The module that DDP and FSDP wrap: its forward runs a policy fn (policy.output_policy, policy.layer_policy).

    Every forward pass of training goes through here, so DDP sees which parameters it
    used and FSDP gathers the root's (embeddings, final norm, lm_head) before they run.
    """
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, policy, input_ids, attention_mask, temperature, mask=None, **kw):
        return policy(self.model, input_ids, attention_mask, temperature, mask, **kw)


def wrap(model, d, fsdp=False, train=True, find_unused=False):
    """Wrapped(model), wrapped for d's world: DDP, or FSDP2 per decoder layer plus the root; as is for one process.

    find_unused: some forward passes leave parameters unused (BuPO's first phase never
    runs the layers above k), which DDP must then look for after each one.
    """
    policy = Wrapped(model)
    if fsdp:
        if not dist.is_initialized():
            raise InputError("--fsdp shards across the processes that torchrun starts: launch with "
                             "torchrun --nproc_per_node=N ... (N=1 for one GPU)")
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(policy)
    if train and dist.is_initialized() and d.world > 1:
        return DistributedDataParallel(policy, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused)
    return policy


def inner(runner):
    """The Wrapped module inside a wrapper (DDP keeps it as .module)."""
    return runner.module if isinstance(runner, DistributedDataParallel) else runner


def accumulate(runner, last):
    """Context of one micro-batch's backward: DDP all-reduces only after the last one of a mini-batch."""
    return runner.no_sync() if isinstance(runner, DistributedDataParallel) and not last else contextlib.nullcontext()


@contextlib.contextmanager
def full_weights(runner):
    """The HF model with whole weights for the duration (FSDP gathers them; all ranks must enter)."""
    sharded = [m for m in inner(runner).modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield inner(runner).model
    finally:
        for m in sharded:
            m.reshard()


# ----------------------------------------------------------------------------- checkpoints
# (all ranks call; rank 0 gets the data)

def model_state(runner):
    """The HF model's full state dict on rank 0 ({} on the others)."""
    sd = get_model_state_dict(inner(runner), options=FULL)
    return {k.removeprefix("model."): v for k, v in sd.items()}  # Wrapped.model.x -> x


def optimizer_state(runner, optimizer):
    """The optimizer's full state keyed by parameter name on rank 0 ({} on the others)."""
    return get_optimizer_state_dict(inner(runner), optimizer, options=FULL)


def load_optimizer_state(runner, optimizer, state):
    """Load a full, name-keyed optimizer state, whatever world size saved it; each rank keeps its shard.

    Parameters that never had a gradient (BuPO's layers above k) have no state in the file
    and get none here: torch initializes every state with a zero-gradient step, which would
    start their Adam step count at 1 instead of 0.
    """
    set_optimizer_state_dict(inner(runner), optimizer, state,
                             options=StateDictOptions(full_state_dict=True, strict=False))
    for name, p in inner(runner).named_parameters():
        if name not in state["state"]:
            optimizer.state.pop(p, None)


def plain_model(runner):
    """The trained HF model, unwrapped: as is for one process or DDP; for FSDP a full copy on rank 0 (None
    elsewhere)."""
    model = inner(runner).model
    if not isinstance(inner(runner), FSDPModule):
        return model
    sd = model_state(runner)
    if not sd:
        return None
    plain = type(model)(model.config)  # on CPU (buffers such as the rotary frequencies built as usual), then filled
    plain.load_state_dict(sd)
    return plain
