"""Where each rank sits in the 3D layout, and the tensor-parallel process groups.

The layout is DeepSpeed's `PipeModelDataParallelTopology`: ranks are ordered (pipe, data,
model), so the ranks of a tensor-parallel group are adjacent (on one node, over NVLink) and
pipeline stages are furthest apart. DeepSpeed's pipeline engine builds the pipeline and
data-parallel groups from the same topology; the tensor-parallel group is created here because
the layers need it when they are built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from neoray.parallel.config import ParallelConfig


@dataclass
class Placement:
    """This rank's coordinates and its tensor-parallel group."""

    topology: PipeModelDataParallelTopology
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup | None  # None when tp == 1


def make_topology(parallel: ParallelConfig) -> PipeModelDataParallelTopology:
    return PipeModelDataParallelTopology(num_pp=parallel.pp, num_mp=parallel.tp, num_dp=parallel.dp)


def place_rank(parallel: ParallelConfig) -> Placement:
    """Coordinates of this process and its tensor-parallel group (collective: all ranks call)."""
    topology = make_topology(parallel)
    coord = topology.get_coord(dist.get_rank())
    tp_group = None
    if parallel.tp > 1:
        # Every rank creates every group, in the same order, as `new_group` requires.
        for ranks in topology.get_axis_comm_lists("model"):
            group = dist.new_group(ranks=ranks)
            if dist.get_rank() in ranks:
                tp_group = group
    return Placement(topology, coord.model, coord.pipe, coord.data, tp_group)
