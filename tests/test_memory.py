"""engine.memory.zeros: a torch.zeros on huge pages where the OS offers them, indistinguishable otherwise."""
import torch

from engine import memory


def test_large_tensor_is_zero_aligned_and_writable():
    shape = (3, 700, 16, 2, 64)  # ~8.6 MB of bf16: several huge pages
    t = memory.zeros(shape, torch.bfloat16, "cpu")
    assert t.shape == shape and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % memory.HUGE_PAGE == 0
    assert not t.any()
    t[2, 699] = 1.5
    assert t.sum().item() == 1.5 * 16 * 2 * 64
    assert t.view(-1).numel() == torch.Size(shape).numel()


def test_small_tensor_is_plain_zeros():
    t = memory.zeros((4, 5), torch.float32, "cpu")
    assert torch.equal(t, torch.zeros(4, 5)) and t.is_contiguous()
