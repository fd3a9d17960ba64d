"""Sharding one run over processes with torch.distributed (torchrun, NCCL on GPUs, gloo on CPU).

Each rank takes every world-th batch and writes its own record files; nothing is exchanged
but barriers. Rank 0 merges the shards into the run folder in the unit order a single process
would have used, so the merged rows equal a single-process run of the same command.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta

import torch
import torch.distributed as dist

from xbench.errors import UserError
from xbench.records import RunFolder


def from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def initialise(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun prepared; returns (rank, world, device for this rank)."""
    rank, world, local_rank = from_environment()
    if "MASTER_ADDR" not in os.environ:
        raise UserError("--distributed: start xbench with torchrun (e.g. torchrun "
                        "--nproc-per-node 2 -m xbench run ...), which sets RANK, WORLD_SIZE "
                        "and MASTER_ADDR")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "gloo"
    if use_cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        backend, index = backend_and_gpu(local_rank, local_world, torch.cuda.device_count())
        torch.cuda.set_device(index)  # before joining, so NCCL binds this rank to its GPU
        device = f"cuda:{index}"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(hours=12))
    return rank, world, device


def backend_and_gpu(local_rank: int, local_world: int, gpus: int) -> tuple[str, int]:
    """(process-group backend, GPU index) of a rank on a machine with ``gpus`` GPUs.

    Ranks share GPUs round-robin when there are more ranks than GPUs; NCCL refuses two ranks
    on one GPU ("Duplicate GPU detected"), so they then join with gloo, which is enough here:
    ranks exchange nothing but barriers.
    """
    if gpus < 1:
        raise UserError("--distributed --device cuda: no CUDA device is visible to this rank; "
                        "use --device cpu or check CUDA_VISIBLE_DEVICES")
    return ("nccl" if local_world <= gpus else "gloo"), local_rank % gpus


def barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()


def finished_units(folder: RunFolder, world: int) -> int:
    """Units finished by all ranks so far (read from their progress files)."""
    return sum(len(folder.shard(rank).finished_units()) for rank in range(world))


def merge_shards(folder: RunFolder, world: int, order: list[str]) -> None:
    """Write the shards' units into ``folder`` in ``order`` (the single-process order)."""
    chunks: dict[str, bytes] = {}
    for rank in range(world):
        shard = folder.shard(rank)
        ends = shard.finished_units()
        data = shard.rows_path.read_bytes() if shard.rows_path.exists() else b""
        start = 0
        for unit, end in sorted(ends.items(), key=lambda item: item[1]):
            chunks[unit] = data[start:end]
            start = end
    missing = [unit for unit in order if unit not in chunks]
    if missing:
        raise UserError(f"{folder.path}: {len(missing)} units are missing from the shards (first: "
                        f"{missing[0]}); rerun the same command with --resume")
    header = folder.header()
    folder.write_header(header)  # truncates rows/progress: the merge is rebuilt from shards
    for unit in order:
        folder.append_raw_unit(unit, chunks[unit])
    for rank in range(world):
        for preview in sorted((folder.shard(rank).path / "maps").glob("*.npz")):
            (folder.path / "maps").mkdir(exist_ok=True)
            shutil.copyfile(preview, folder.path / "maps" / preview.name)
