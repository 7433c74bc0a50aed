"""Loads the model and its KV pool, turns a batch of sequences into flat step inputs and returns last logits."""
from itertools import chain
from pathlib import Path

import torch

from engine.attention.base import AttentionBackend
from engine.attention.registry import create_backend
from engine.config import DTYPES, EngineConfig
from engine.gpu_memory import (
    activation_bytes,
    check_wake_up,
    cuda_kv_budget,
    device_free_bytes,
    module_bytes,
    parameter_bytes,
)
from engine.kv_cache import KVCache, cdiv
from engine.layers.matmul_choice import model_shapes, resolve_kernel
from engine.models.loader import NamedTensors, check_named_tensors, copy_named_tensors, load_weights, read_config
from engine.models.registry import ModelArgsLike, model_spec
from engine.sequence import Sequence
from engine.step_tensors import to_device

CPU_KV_CACHE_GB = 1.0


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        self.device = torch.device(config.device)
        hf_config = read_config(model_dir)
        spec = model_spec(hf_config)
        self.args = spec.parse_args(hf_config)
        self.dtype = self._dtype(config.dtype, self.args)
        self.max_model_len = min(config.max_model_len or self.args.max_position_embeddings,
                                 self.args.max_position_embeddings)
        self.block_size = config.block_size
        self.model = spec.model_class(self.args, self.dtype, self.device, self.max_model_len)
        load_weights(self.model, model_dir)
        self.matmul_kernel = self._matmul_kernel()
        self.model.pack_weights(config.pack_weights, self.matmul_kernel)
        self.model.use_fused_ops(config.fused_ops)
        self.model.fused_decode = config.fused_decode
        self.model.eval()
        self.num_kv_blocks = self._num_blocks()
        self.weights_offloaded = False
        self.offloads_weights = self.device.type == "cuda"  # sleep level 2 moves weights to host memory (GPU only)
        self._build_kv()

    def _build_kv(self) -> None:
        """The KV pool and the attention backend over it (at start-up and on wake_up)."""
        a, config = self.args, self.config
        self.kv: KVCache | None = KVCache(a.num_layers, self.num_kv_blocks, self.block_size, a.num_kv_heads,
                                          a.head_dim, self.dtype, self.device, config.enable_prefix_caching)
        self.attn: AttentionBackend | None = create_backend(config.attention_backend, self.kv.k, self.kv.v,
                                                            a.num_heads, a.head_dim ** -0.5, config, self.device)
        self.model.set_attention(self.attn)

    @property
    def asleep(self) -> bool:
        return self.kv is None

    def sleep(self, offload_weights: bool = False) -> None:
        """Frees the KV pool (and the attention backend's views of it); offload_weights also moves the weights
        to CPU memory (pinned) where they can go (a GPU). The caller makes sure no sequence holds blocks."""
        if self.kv is not None:
            self.model.set_attention(None)
            self.kv = self.attn = None
        if offload_weights and self.offloads_weights and not self.weights_offloaded:
            self._move_weights(torch.device("cpu"))
            self.weights_offloaded = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up_weights(self) -> None:
        """Brings offloaded weights back to the device (first checks that they fit in its free memory)."""
        if not self.weights_offloaded:
            return
        check_wake_up(device_free_bytes(self.device), {"weights": parameter_bytes(self.model)})
        self._move_weights(self.device)
        self.weights_offloaded = False

    def wake_up_kv_cache(self) -> None:
        """Re-creates the KV pool (same number of blocks, zeroed) after checking that it, the step's activations
        and any weights still offloaded fit in the device's free memory."""
        if self.kv is not None:
            return
        a = self.args
        need = {"KV pool": self.num_kv_blocks * KVCache.bytes_per_block(a.num_layers, self.block_size,
                                                                         a.num_kv_heads, a.head_dim, self.dtype),
                "activations": self._activation_bytes()}
        if self.weights_offloaded:  # they come back later and need their room then
            need["offloaded weights"] = parameter_bytes(self.model)
        check_wake_up(device_free_bytes(self.device), need)
        self._build_kv()

    def _move_weights(self, device: torch.device) -> None:
        """Weights to pinned host memory or back (tied weights are one Parameter: moved once)."""
        pin = self.device.type == "cuda"
        for param in self.model.parameters():
            if device.type == "cpu":
                host = torch.empty_like(param.data, device="cpu", pin_memory=pin)
                param.data = host.copy_(param.data, non_blocking=pin)
            else:
                param.data = param.data.to(device, non_blocking=pin)
        if pin:
            torch.cuda.synchronize(self.device)
        self.model.pack_weights(self.config.pack_weights, self.matmul_kernel)

    def _matmul_kernel(self) -> str:
        """The CPU matmul path (engine/layers/matmul_choice.py): the config's, or the one stored for this machine."""
        c = self.config
        if self.device.type != "cpu" or not c.pack_weights:
            return "torch"
        return resolve_kernel(model_shapes(self.model), self.dtype, c.matmul_kernel, c.batch_invariant)

    @staticmethod
    def _dtype(name: str, args: ModelArgsLike) -> torch.dtype:
        if name == "auto":
            return DTYPES.get(str(args.torch_dtype or "bfloat16").replace("torch.", ""), torch.bfloat16)
        return DTYPES[name]

    def _activation_bytes(self) -> int:
        c = self.config
        assert c.max_num_batched_tokens is not None, "EngineConfig.__post_init__ resolves it"
        return activation_bytes(self.args, c.max_num_batched_tokens, c.max_num_seqs, self.dtype)

    def _num_blocks(self) -> int:
        c, a = self.config, self.args
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        if c.kv_cache_tokens is not None:
            return cdiv(c.kv_cache_tokens, self.block_size)
        per_block = KVCache.bytes_per_block(a.num_layers, self.block_size, a.num_kv_heads, a.head_dim, self.dtype)
        if c.kv_cache_memory_gb is not None:
            budget = c.kv_cache_memory_gb * 2**30
        elif self.device.type == "cuda":
            activations = self._activation_bytes()
            budget = cuda_kv_budget(self.device, c.gpu_memory_utilization, module_bytes(self.model), activations)
        else:
            budget = CPU_KV_CACHE_GB * 2**30
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise ValueError(f"a KV budget of {budget / 2**30:.3f} GiB holds no block of {per_block} bytes")
        return num_blocks

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Computes tokens[num_cached : num_cached + num_scheduled] of every sequence; returns the fp32 logits [B, V]
        of the last token of each sequence whose piece reaches its end (the others sample nothing yet)."""
        if self.kv is None or self.attn is None:
            raise RuntimeError("the model runner is asleep (sleep() freed its KV pool): wake_up_kv_cache() first")
        self.kv.copy_blocks(self.kv.take_pending_copies())
        input_ids, positions, logits_indices = self._prepare(seqs, self.attn)
        return self.model(input_ids, positions, logits_indices)

    def _prepare(self, seqs: list[Sequence], attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        kv_lens: list[int] = []
        last_rows: list[int] = []
        for seq in seqs:
            start, table = seq.num_cached_tokens, seq.block_table
            end = start + seq.num_scheduled_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            q_lens.append(end - start)
            kv_lens.append(end)
            if end == len(seq):
                last_rows.append(len(input_ids) - 1)
        width = max(len(seq.block_table) for seq in seqs)
        tables = chain.from_iterable(seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs)
        ids_t, positions_t, slots_t, tables_t, logits_indices = to_device(
            self.device, torch.int64, input_ids, positions, slots, list(tables), last_rows)
        attn.plan(q_lens, kv_lens, tables_t.view(len(seqs), width), slots_t)
        return ids_t, positions_t, logits_indices

    @torch.inference_mode()
    def update_weights(self, named_tensors: NamedTensors) -> int:
        """Copies (HF name, tensor) pairs into the model in place, all checked first (check_named_tensors: names,
        shapes, floating dtypes, finite values), so a refused update writes nothing; returns how many were written."""
        items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        views = self.model.hf_parameter_views()
        check_named_tensors(views, items)
        written = len(copy_named_tensors(views, items))
        self.model.pack_weights(self.config.pack_weights, self.matmul_kernel)
        return written
