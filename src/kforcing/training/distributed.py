"""Data-parallel training across processes (docs/DISTRIBUTED.md).

`torchrun --standalone --nproc_per_node N -m kforcing train|distill ...` (or `--nproc N`, which
re-launches through torchrun) runs N copies of the same job. Each one:
- joins a process group (gloo on CPU, nccl on CUDA, chosen from the run's device), reading its
  rank and the world size from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK);
- reads its own disjoint slice of every global batch (`shard`), so the batch size and the LR
  schedule the config names are the global ones, whatever N is;
- wraps its model in PyTorch's DistributedDataParallel, which averages the gradients;
- leaves checkpoints and metrics to rank 0 (`is_main`); every rank resumes from the same
  checkpoint, each restoring its own RNG state.

Without torchrun's environment every function here is the single-process identity, so the
training loops carry no `if distributed` branches of their own.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kforcing.errors import KForcingError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
AGENT_LOG = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d")   # torchrun's own log lines
TIMEOUT = datetime.timedelta(minutes=30)   # a collective waits this long for a rank


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job: rank in [0, world), and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_context() -> Context:
    """The rank and world size torchrun exported; a single process without them."""
    if "WORLD_SIZE" not in os.environ:
        return Context()
    try:
        rank, world, local = (int(os.environ.get(v, "0")) for v in ENV_VARS)
    except ValueError:
        raise KForcingError(f"bad torchrun environment: {[os.environ.get(v) for v in ENV_VARS]}"
                            ) from None
    if not 0 <= rank < world:
        raise KForcingError(f"bad torchrun environment: RANK {rank}, WORLD_SIZE {world}")
    return Context(rank, world, local)


def backend_for(device: str) -> str:
    """gloo on CPU; on CUDA nccl for device tensors plus gloo for the CPU-side reductions
    (metrics, clocks) the trainers make."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def setup(device: str) -> tuple[Context, str]:
    """Join the process group torchrun set up (once per process), and return this rank's
    context and device: on CUDA, rank r of a node uses cuda:LOCAL_RANK."""
    ctx = env_context()
    if ctx.world == 1:
        return ctx, device
    if torch.device(device).type == "cuda":
        device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    return ctx, device


def world() -> Context:
    """The context of the process group this process has joined (a single process if none)."""
    if not dist.is_initialized():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), env_context().local_rank)


def is_main() -> bool:
    return world().main


def shard(batch_indices: Sequence[int], ctx: Context | None = None) -> list[int]:
    """This rank's contiguous slice of a global batch: disjoint across ranks, covering it.
    The global batch must divide evenly, so DDP's average of the per-rank mean losses is the
    mean loss of the global batch."""
    ctx = ctx or world()
    n = len(batch_indices)
    if n % ctx.world:
        raise KForcingError(f"batch size {n} does not split evenly over {ctx.world} processes: "
                            f"use a multiple of {ctx.world}")
    per = n // ctx.world
    return list(batch_indices[ctx.rank * per : (ctx.rank + 1) * per])


class Method(torch.nn.Module):
    """A module whose forward is another module's method (DDP hooks forward only): the
    distiller trains through PushForward.staircase_forward."""

    def __init__(self, module: torch.nn.Module, name: str):
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.name)(*args, **kwargs)


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """`model` in DistributedDataParallel when there is more than one rank, else itself."""
    if world().world == 1:
        return model
    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on accumulation steps (sync=False)."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def mean(value: float, device: str = "cpu") -> float:
    """The mean of a scalar over ranks (a metric; gradients are DDP's job)."""
    if world().world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world().world


def mean_tensor(t: torch.Tensor) -> torch.Tensor:
    if world().world == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world().world


def maximum(value: float, device: str = "cpu") -> float:
    """The max of a scalar over ranks: clocks and stop flags, so every rank takes the same
    decision (stop, validate, save) at the same step."""
    if world().world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def total(value: float, device: str = "cpu") -> float:
    """The sum of a scalar over ranks: CPU seconds spent by the whole job."""
    if world().world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def gather(obj: object) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world().world == 1:
        return [obj]
    out: list = [None] * world().world
    dist.all_gather_object(out, obj)
    return out


def span(n: int, ctx: Context | None = None) -> slice:
    """This rank's contiguous part of n items that need not split evenly (a held-out set):
    the first n % world ranks take one more; disjoint across ranks, covering range(n)."""
    ctx = ctx or world()
    per, extra = divmod(n, ctx.world)
    start = ctx.rank * per + min(ctx.rank, extra)
    return slice(start, start + per + (ctx.rank < extra))


def gather_rng() -> list[torch.Tensor]:
    """Every rank's CPU RNG state, in rank order (all ranks call it; rank 0 saves them)."""
    state = torch.get_rng_state()
    if world().world == 1:
        return [state]
    out: list = [None] * world().world
    dist.all_gather_object(out, state)
    return out


def rng_key(rank: int) -> str:
    return "rng.torch" if rank == 0 else f"rng.torch.rank{rank}"


def barrier() -> None:
    if world().world > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block (writes), the others wait for it; yields whether to write."""
    ctx = world()
    try:
        yield ctx.main
    finally:
        barrier()


def teardown() -> None:
    """Leave the process group together: a rank that destroys its gloo group while a peer is
    still sending can abort in gloo's transport thread at exit ("terminate called without an
    active exception", seen once in a 2-process test run), so every rank waits for the others
    first."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Around a whole train / distill command. Inside a multi-process job: a user error names
    its rank; a rank whose collective broke because another rank died exits 1 without a
    message of its own (the failing rank printed the one that matters, and torchrun stops the
    rest); a run that ends well leaves the process group cleanly."""
    ctx = env_context()
    try:
        yield
    except KForcingError as e:
        if ctx.world > 1:
            raise KForcingError(f"(rank {ctx.rank} of {ctx.world}) {e}") from None
        raise
    except (dist.DistError, RuntimeError) as e:
        if ctx.world > 1 and _peer_failure(e):
            # a broken process group cannot be torn down cleanly (gloo aborts the process)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise
    teardown()


def _peer_failure(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo",
                            "NCCL", "Broken pipe"))


def torchrun_command(nproc: int, argv: Sequence[str],
                     program: Sequence[str] = ("-m", "kforcing")) -> list[str]:
    """The torchrun command that re-runs `kforcing argv` (without --nproc) on nproc ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *program, *argv]


def launch(nproc: int, argv: Sequence[str], program: Sequence[str] = ("-m", "kforcing")) -> int:
    """Run `kforcing argv` on nproc local processes through torchrun; its exit status.
    torchrun stops every rank when one fails; the failing rank has already printed its one
    line, so torchrun's own report (a traceback of its agent) is kept out of the way."""
    if nproc < 1:
        raise KForcingError(f"--nproc must be >= 1, got {nproc}")
    if shutil.which(sys.executable) is None:
        raise KForcingError(f"cannot find the Python interpreter {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(torchrun_command(nproc, argv, program), env=env, stderr=subprocess.PIPE,
                          text=True)
    report = False
    for line in proc.stderr.splitlines():
        # torchrun's own failure report: its agent's log lines (W1130 12:00:00 ...), then a
        # traceback of the agent and a banner
        if line.startswith("kforcing:"):
            print(line, file=sys.stderr)
            continue
        if line.startswith(("Traceback", "=====")) or "torch.distributed" in line:
            report = True
        if not report and not AGENT_LOG.match(line):
            print(line, file=sys.stderr)
    if proc.returncode:
        print(f"kforcing: error: the {nproc}-process run failed (exit {proc.returncode})",
              file=sys.stderr)
    return proc.returncode


def without_nproc(argv: Sequence[str]) -> list[str]:
    """argv without its --nproc N / --nproc=N (the command torchrun re-runs on each rank)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
