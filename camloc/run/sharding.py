"""Sharded runs on the usual launchers: `--shard i/n`, torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or
SLURM srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). No process group is needed to compute: each
rank takes a deterministic share of the images and appends its own records file in the shared run
folder; summaries and `camloc report` merge every rank's records."""
from __future__ import annotations

import os

from camloc.datasets import ImagePairs
from camloc.errors import OptionError, RunFolderError
from camloc.run.files import record_files  # noqa: F401  (re-exported: shard record files)


def _env_int(env, name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RunFolderError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_shard(option: str | None = None, env=None) -> tuple[int, int]:
    """(rank, world size) from `--shard i/n`, else torchrun's, else SLURM's variables, else (0, 1)."""
    env = os.environ if env is None else env
    if option:
        try:
            rank, world = (int(v) for v in option.split("/"))
        except ValueError:
            raise OptionError(f"--shard {option!r} must look like i/n, e.g. 0/4") from None
    elif _env_int(env, "WORLD_SIZE") is not None:
        rank, world = _env_int(env, "RANK") or 0, _env_int(env, "WORLD_SIZE")
    elif _env_int(env, "SLURM_NTASKS") is not None:
        rank, world = _env_int(env, "SLURM_PROCID") or 0, _env_int(env, "SLURM_NTASKS")
    else:
        return 0, 1
    if world < 1 or not 0 <= rank < world:
        raise RunFolderError(f"shard {rank}/{world} is out of range: the rank must satisfy 0 <= rank < {world}")
    return rank, world


def start_shard(option: str | None) -> tuple[int, int]:
    """The CLI's shard: `resolve_shard(option)`; without `--shard`, join torchrun's process group when
    launched by it (`join_process_group`)."""
    rank_world = resolve_shard(option)
    if option is None:
        join_process_group()
    return rank_world


def local_rank(env=None) -> int | None:
    """The GPU index of this process on its machine (LOCAL_RANK or SLURM_LOCALID), if launched so."""
    env = os.environ if env is None else env
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = _env_int(env, name)
        if value is not None:
            return value
    return None


def rank_device(device: str) -> str:
    """`auto` under a launcher that sets a local rank, on a CUDA machine: that rank's GPU."""
    import torch

    if device == "auto" and torch.cuda.is_available() and local_rank() is not None:
        return f"cuda:{local_rank()}"
    return device


def assign_images(images: list[ImagePairs], rank: int, world: int) -> list[ImagePairs]:
    """This rank's share: images dealt largest first (by pair count, dataset order on ties) to the
    rank with the fewest pairs so far (lowest rank on ties). Every image goes to exactly one rank, and
    every rank computes the same assignment."""
    if world == 1:
        return list(images)
    loads = [0] * world
    owner = {}
    order = sorted(range(len(images)), key=lambda i: (-len(images[i].pairs), i))
    for i in order:
        target = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = target
        loads[target] += len(images[i].pairs)
    return [images[i] for i in range(len(images)) if owner[i] == rank]


def records_name(rank: int, world: int, stem: str = "pairs") -> str:
    return f"{stem}.jsonl" if world == 1 else f"{stem}.rank{rank:03d}-of-{world:03d}.jsonl"


def join_process_group(env=None) -> bool:
    """Under torchrun (MASTER_ADDR set, WORLD_SIZE > 1) join a gloo process group, so rank 0 can wait
    for the other ranks and write the merged summary. Returns whether a group is in use."""
    import datetime

    import torch.distributed as dist

    env = os.environ if env is None else env
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "MASTER_ADDR" not in env or (_env_int(env, "WORLD_SIZE") or 1) < 2:
        return False
    # long, uneven shards: rank 0 may wait for hours at the final barrier
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return True


def process_group_ready() -> bool:
    """Whether this process is in an initialised torch.distributed group (`join_process_group`)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
