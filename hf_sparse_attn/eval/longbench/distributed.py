"""The processes of a sharded LongBench run: who am I, how many are we, and where does my model go.

The launchers (``torchrun``, ``python -m torch.distributed.run``, ``accelerate launch`` with several processes) set
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each process. With ``WORLD_SIZE``
> 1 we join the process group through ``torch.distributed.init_process_group(init_method="env://")`` and check that
it really holds ``WORLD_SIZE`` processes; a process that would end up alone refuses to run, so a run can never
silently predict every sample in every process.

The group always uses the ``gloo`` backend, on CPU and GPU machines alike: the processes exchange only a few small
Python objects (the list of samples still to predict, to check that all agree, and a final barrier), never tensors,
so NCCL would add nothing but one-GPU-per-rank rules and its watchdog. The model of process ``LOCAL_RANK`` goes to
``cuda:LOCAL_RANK`` where CUDA is available, else to the CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Processes", "start_processes", "joined_processes", "MPI_SIZE_VARIABLES", "GROUP_TIMEOUT"]

# The longest any process waits for the others at a collective step. The slowest process reaches the final
# barrier at most one sample behind the others (the remaining samples are dealt out one by one), but model loading
# and a long sample on a big model take minutes, so this is generous.
GROUP_TIMEOUT = datetime.timedelta(hours=6)

# Variables that MPI launchers set. One of them > 1 without WORLD_SIZE means several copies of the command were
# started by a launcher that torch.distributed does not know: each would think it is alone.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass
class Processes:
    """This process's place in the run. ``rank`` in [0, world_size); ``device`` is where its model goes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_gather(self, obj: Any) -> list:
        """The ``obj`` of every process, in rank order (a collective step: every process must call it)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj``, in every process."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self, finished: bool = True) -> None:
        """Leave the process group (a no-op for a single process).

        ``finished``: this process's work ended without an error. Then every process waits for the others and they
        leave the group together: gloo's threads in a process that left while another still used the group could
        abort that process at exit (SIGABRT, "terminate called without an active exception") after its work was
        done. After an error the process neither waits (the others may never come) nor leaves: it exits, and the
        launcher stops the others."""
        if not self.distributed or not finished:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _device(local_rank: int, world_size: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if world_size > 1 and local_rank >= count:
        raise ValueError(f"process LOCAL_RANK={local_rank} has no GPU of its own: {count} visible on this machine. "
                         f"Start at most {count} processes per machine (one model copy per GPU).")
    return torch.device("cuda", local_rank if world_size > 1 else 0)


def start_processes(timeout: datetime.timedelta = GROUP_TIMEOUT) -> Processes:
    """Join the launcher's process group (``WORLD_SIZE`` > 1) or run alone; raise a clear error where the launch
    is inconsistent (``WORLD_SIZE`` > 1 without the other variables, a group smaller than ``WORLD_SIZE``, MPI
    copies without ``WORLD_SIZE``)."""
    world_size = _env_int("WORLD_SIZE")
    if world_size is None or world_size == 1:
        for name in MPI_SIZE_VARIABLES:
            size = _env_int(name)
            if size is not None and size > 1:
                raise ValueError(f"{name}={size}: this is one of {size} processes started by an MPI launcher, but "
                                 "WORLD_SIZE is not set, so each would predict every sample. Launch with "
                                 "`torchrun --nproc_per_node N -m hf_sparse_attn.cli longbench ...` (or accelerate "
                                 "launch with several processes) instead.")
        local_rank = _env_int("LOCAL_RANK") or 0
        return Processes(rank=0, world_size=1, local_rank=local_rank, device=_device(local_rank, 1))
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE={world_size}: expected a positive number of processes")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: this process cannot join the "
                         "other processes and refuses to run alone (it would predict every sample). Launch with "
                         "torchrun / accelerate launch, which set them, or unset WORLD_SIZE for a single process.")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    local_rank = rank if local_rank is None else local_rank
    device = _device(local_rank, world_size)

    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed: refusing to run "
                         "alone (it would predict every sample)")
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", init_method="env://", world_size=world_size, rank=rank,
                                timeout=timeout)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"the process group has {dist.get_world_size()} processes (this one rank {dist.get_rank()}) "
                         f"but WORLD_SIZE={world_size}, RANK={rank}: refusing to run with an inconsistent group")
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


@contextlib.contextmanager
def joined_processes() -> Iterator[Processes]:
    """:func:`start_processes` for the block's work, then :meth:`Processes.close`: together after the block ends,
    at once (``finished=False``) where it raised."""
    processes = start_processes()
    try:
        yield processes
    except BaseException:
        processes.close(finished=False)
        raise
    processes.close()
