"""noise.py against a plain-Python reading of its definition: keys and bits by lowbias32 (Wellons' 32-bit hash:
x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16, all mod 2**32), u = n * 2**-24 with
n = (bits >> 8) | 1, g = -log(-log u). The sampler tests take their float64 reference noise from noise.py itself,
so this file is what pins noise.py down (mutation testing showed its mutants surviving every sampler test)."""
import math

import pytest
import torch

from ettrl_kernels import noise

M32 = 0xFFFFFFFF
SALT = 0x9E3779B9
EDGES = [0, 1, 2, 0xFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xDEADBEEF, M32]


def lowbias32(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def signed(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def row_key(seed: int, seq_id: int, position: int) -> int:
    h = lowbias32((seed & M32) ^ SALT)
    h = lowbias32(h ^ (seed >> 32))
    h = lowbias32(h ^ (seq_id & M32) ^ ((seq_id >> 32) * SALT))
    return signed(lowbias32(h ^ (position & M32)))


def numerator(key: int, token: int) -> int:
    return ((lowbias32((key ^ token) & M32) >> 8) & 0xFFFFFF) | 1


def some_uint32(n: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return EDGES + torch.randint(0, 1 << 32, (n,), generator=g, dtype=torch.int64).tolist()


def test_mix32_is_lowbias32_with_wrap_around():
    values = some_uint32(500)
    h = torch.tensor([signed(v) for v in values], dtype=torch.int32)
    assert noise.mix32_(h).tolist() == [signed(lowbias32(v)) for v in values]
    h64 = torch.tensor(values, dtype=torch.int64)
    assert noise._mix32_int64(h64).tolist() == [lowbias32(v) for v in values]


def test_as_int32_keeps_the_bits():
    for v in (0, 1, 0x7FEB352D, 0x7FFFFFFF, 0x80000000, 0x846CA68B, M32):
        assert noise._as_int32(v) == signed(v)


def test_row_keys_mix_seed_sequence_and_position():
    seeds = [0, 1, 12345, (1 << 32) + 7, (1 << 62) + 3]
    seq_ids = [0, 1, 9, (1 << 33) + 1, 5]
    positions = [0, 1, 17, 4095, (1 << 32) + 2]
    got = noise.row_keys(torch.tensor(seeds), torch.tensor(seq_ids), torch.tensor(positions))
    assert got.dtype == torch.int32
    assert got.tolist() == [row_key(s, q, p) for s, q, p in zip(seeds, seq_ids, positions)]


def test_uniform_bits_give_odd_24_bit_numerators():
    values = some_uint32(500)
    bits = torch.tensor([signed(v) for v in values], dtype=torch.int32)
    assert noise.uniform_bits_(bits).tolist() == [((v >> 8) & 0xFFFFFF) | 1 for v in values]


@pytest.mark.parametrize("key", [0, -1, 123456789, -(1 << 31)])
def test_gumbel_against_float64(key):
    tokens = torch.arange(0, 50000, 97)
    got = noise.gumbel(torch.tensor([key], dtype=torch.int32), tokens)
    assert got.dtype == torch.float32
    want = torch.tensor([-math.log(-math.log(numerator(key, t) * 2.0 ** -24)) for t in tokens.tolist()],
                        dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


def test_constants():
    assert noise.U_SCALE == 2.0 ** -24 and noise.KEY_SALT == SALT
    assert (noise.MIX_MUL1, noise.MIX_MUL2) == (0x7FEB352D, 0x846CA68B)
    top = (2 ** 24 - 1) * 2.0 ** -24  # the largest u
    assert noise.GUMBEL_MAX == pytest.approx(-math.log(-math.log(top)), rel=1e-12)
