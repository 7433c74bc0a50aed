"""bench/roofline.py's floor against hand-computed step times."""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("roofline", Path(__file__).parent.parent / "bench" / "roofline.py")
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)

# 1000 matmul parameters, one layer, one head of width 2: fp32 weights 4000 bytes, K + V 16 bytes a token, q.k and
# p.v 8 FLOPs a row per context token
SIZES = {"matmul_params": 1000, "layers": 1, "heads": 1, "kv_heads": 1, "head_dim": 2}


def test_memory_bound_floor():
    # 1000 FLOP/s and 1000 B/s; prefill of 2 rows (context 1): max(2 x 2008, 4000 + 2 x 16) = 4032 -> 4.032 s;
    # one decode step (context 3): max(2024, 4000 + 48) -> 4.048 s; 2 tokens in 8.08 s
    floor = roofline.floor_tokens_per_s(SIZES, torch.float32, 1, 2, 2, gflops=1e-6, gbps=1e-6)
    assert floor == pytest.approx(2 / 8.08)


def test_compute_bound_floor():
    # unlimited bandwidth: 4016 + 2024 FLOPs at 1000 FLOP/s
    floor = roofline.floor_tokens_per_s(SIZES, torch.float32, 1, 2, 2, gflops=1e-6, gbps=1e9)
    assert floor == pytest.approx(2 / 6.04)


def test_bf16_halves_the_bytes():
    slow_memory = {"gflops": 1e9, "gbps": 1e-6}
    fp32 = roofline.floor_tokens_per_s(SIZES, torch.float32, 4, 8, 16, **slow_memory)
    bf16 = roofline.floor_tokens_per_s(SIZES, torch.bfloat16, 4, 8, 16, **slow_memory)
    assert bf16 == pytest.approx(2 * fp32)


def test_machine_header_names_the_cpu():
    header = roofline.machine_header()
    assert header.startswith("CPU: ") and "features:" in header and torch.__version__ in header


def test_samples_of_one_prompt_prefill_it_once():
    # unlimited bandwidth, 2 samples x 2 tokens. One prompt: prefill 2 rows (context 1) 2 x 2008 = 4016 FLOPs, one
    # decode step of 2 rows (context 3) 2 x 2024 = 4048: 4 tokens in 8.064 s. Two prompts: prefill 4 rows, 8032.
    compute_bound = {"gflops": 1e-6, "gbps": 1e9}
    one = roofline.floor_tokens_per_s(SIZES, torch.float32, 2, 2, 2, distinct_prompts=1, **compute_bound)
    two = roofline.floor_tokens_per_s(SIZES, torch.float32, 2, 2, 2, **compute_bound)
    assert one == pytest.approx(4 / 8.064) and two == pytest.approx(4 / 12.08)


def test_prefill_floor():
    # 1000 matmul parameters of which 100 lm_head, 10 tokens: 2 x 900 x 10 + 2 x 100 + 8 x 100 / 2 = 18600 FLOPs at
    # 1000 FLOP/s; bytes 4000 + 10 x 16 at unlimited bandwidth
    sizes = {**SIZES, "lm_head_params": 100}
    assert roofline.prefill_seconds(sizes, torch.float32, 10, gflops=1e-6, gbps=1e9) == pytest.approx(18.6)
    assert roofline.prefill_seconds(sizes, torch.float32, 10, gflops=1e9, gbps=1e-6) == pytest.approx(4.16)
