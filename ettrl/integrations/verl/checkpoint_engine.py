"""GlooCheckpointEngine: verl's trainer -> rollout weight sync over a gloo group (CPU tensors, TCP).

For rollouts apart from training without GPUs (verl's NCCL engine needs cupy and CUDA), and as a reference for
the NCCL path: the same protocol as verl's NCCLCheckpointEngine. The trainer's rank 0 (is_master) is rank 0 of a
group of its own with every rollout worker (ranks 1..n); the trainer's other ranks sit out but still walk their
weight generator (producing a weight is collective over the trainer's ranks). Weights travel in buckets of
`bucket_size` bytes (each tensor 16-byte aligned): a JSON header (names, shapes, dtypes, offsets; no pickle), then
the bucket, both broadcast from rank 0. The group is its own ProcessGroupGloo over a TCPStore that rank 0 serves,
so it never touches the process's default group (verl's rollout workers already hold one).
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore
from verl.checkpoint_engine.base import CheckpointEngine, TensorMeta, merge_weight_chunks, split_weight_chunks
from verl.workers.rollout.utils import ensure_async_iterator

from ettrl.integrations.verl.net import free_port, node_address

if TYPE_CHECKING:  # annotations only
    from ettrl.integrations.verl.adapter import NamedWeights

SITS_OUT = -1
ALIGN = 16  # bytes: each tensor starts aligned in its bucket, so the receiver can view the bytes as its dtype


@dataclass
class GlooMaster:
    """Where the group meets: rank 0's address and the port of its TCPStore."""
    host: str
    port: int


class GlooCheckpointEngine(CheckpointEngine):
    def __init__(self, bucket_size: int, is_master: bool = False, timeout_s: float = 600.0, **unused: Any) -> None:
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1 byte, got {bucket_size}")
        self.bucket_size, self.is_master = bucket_size, is_master
        self.timeout = timedelta(seconds=timeout_s)
        self.rank: int | None = None
        self.group: ProcessGroupGloo | None = None
        self.store: TCPStore | None = None
        self.master: GlooMaster | None = None

    # ---- set-up, once per sync --------------------------------------------------------------------------------
    def prepare(self) -> GlooMaster | None:
        if not self.is_master:
            return None
        host = node_address()
        self.master = GlooMaster(host, free_port(host))
        return self.master

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[GlooMaster | None]
                       ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        master = metadata[0]
        if not isinstance(master, GlooMaster):
            raise ValueError("the trainer's rank 0 must be the gloo checkpoint engine's master (is_master=True); "
                             f"its prepare() returned {master!r}")
        world_size = 1 + rollout_world_size
        actor: dict[str, list[Any]] = {
            "rank": [0] + [SITS_OUT] * (actor_wg_world_size - 1), "world_size": [world_size] * actor_wg_world_size,
            "master_metadata": [master] * actor_wg_world_size}
        rollout: dict[str, list[Any]] = {
            "rank": list(range(1, world_size)), "world_size": [world_size] * rollout_world_size,
            "master_metadata": [master] * rollout_world_size}
        return actor, rollout

    def init_process_group(self, rank: int, world_size: int, master_metadata: GlooMaster) -> None:
        """Blocks until every rank of the group has joined."""
        self.rank = rank
        if rank == SITS_OUT:
            return
        self.store = TCPStore(master_metadata.host, master_metadata.port, world_size, is_master=rank == 0,
                              timeout=self.timeout)
        options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # private in torch's stubs, public in C++
        options._timeout = self.timeout
        options._devices = [ProcessGroupGloo.create_device(hostname=master_metadata.host if rank == 0
                                                           else node_address())]
        self.group = ProcessGroupGloo(PrefixStore("ettrl_weights", self.store), rank, world_size, options)

    def finalize(self) -> None:
        self.group, self.store, self.rank = None, None, None

    # ---- transfer ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    async def send_weights(self, weights: NamedWeights, global_steps: int | None = None) -> None:
        if self.rank == SITS_OUT:
            async for _ in ensure_async_iterator(weights):
                pass
            return
        if self.rank != 0:
            raise RuntimeError(f"only rank 0 of the gloo group sends weights; this is rank {self.rank}")
        bucket = torch.empty(self.bucket_size, dtype=torch.uint8)
        metas: list[TensorMeta] = []
        offset = 0
        async for meta, chunk in split_weight_chunks(weights, self.bucket_size):
            offset = -(-offset // ALIGN) * ALIGN
            if offset + meta.chunk_size > self.bucket_size:
                await asyncio.to_thread(self._broadcast_bucket, bucket, metas, offset, False)
                metas, offset = [], 0
            meta.offset = offset
            bucket[offset:offset + meta.chunk_size].copy_(chunk.detach().to("cpu", non_blocking=False))
            metas.append(meta)
            offset += meta.chunk_size
        await asyncio.to_thread(self._broadcast_bucket, bucket, metas, offset, True)

    async def receive_weights(self, global_steps: int | None = None) -> AsyncIterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor); each bucket arrives in a fresh buffer, so a yielded tensor stays valid."""
        if self.group is None or self.rank == 0:
            raise RuntimeError("receive_weights needs a rollout rank (>= 1) of an initialised gloo group")
        async for name, tensor in merge_weight_chunks(self._chunks(), self.bucket_size):
            yield name, tensor

    async def _chunks(self):
        while True:
            metas, bucket, last = await asyncio.to_thread(self._receive_bucket)
            for meta in metas:
                yield meta, bucket[meta.offset:meta.offset + meta.chunk_size]
            if last:
                return

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.group is None:
            raise RuntimeError("the gloo group is not initialised (init_process_group)")
        self.group.broadcast([tensor], _root()).wait()  # type: ignore[attr-defined]  # in C++, not in torch's stub

    def _broadcast_bucket(self, bucket: torch.Tensor, metas: list[TensorMeta], length: int, last: bool):
        header = json.dumps({"length": length, "last": last, "tensors": [_meta_to_json(m) for m in metas]}).encode()
        self._broadcast(torch.tensor([len(header)], dtype=torch.int64))
        self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        self._broadcast(bucket[:length])

    def _receive_bucket(self) -> tuple[list[TensorMeta], torch.Tensor, bool]:
        size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size)
        raw = torch.empty(int(size), dtype=torch.uint8)
        self._broadcast(raw)
        header = json.loads(bytes(raw.tolist()).decode())
        bucket = torch.empty(header["length"], dtype=torch.uint8)
        self._broadcast(bucket)
        return [_meta_from_json(m) for m in header["tensors"]], bucket, header["last"]


def _root():
    from torch.distributed import BroadcastOptions
    options = BroadcastOptions()
    options.rootRank = 0
    return options


def _meta_to_json(m: TensorMeta) -> dict:
    return {"name": m.name, "shape": list(m.shape), "dtype": str(m.dtype).removeprefix("torch."),
            "chunk_offset": m.chunk_offset, "chunk_size": m.chunk_size, "offset": m.offset}


def _meta_from_json(d: dict) -> TensorMeta:
    dtype = getattr(torch, d["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {d['dtype']!r} in a weight bucket header")
    return TensorMeta(d["name"], torch.Size(d["shape"]), dtype, d["chunk_offset"], d["chunk_size"], d["offset"])
