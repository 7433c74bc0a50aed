"""The counter-based Gumbel noise shared by the torch and Triton samplers.

Noise is a pure function of four keys, never of batch composition or row order, so a sequence samples the
same token whatever batch it decodes in:

    key(seed, seq_id, position) = mix32(mix32(mix32(mix32(seed_lo ^ SALT) ^ seed_hi) ^ seq_lo ^ seq_hi * SALT)
                                        ^ position_lo)                    (per row, mod 2**32, on the host)
    bits(key, token)           = mix32(key ^ token)                       (per element, uint32 wrap-around)
    u                          = ((bits >> 8) | 1) * 2**-24               (odd multiple of 2**-24: exact, in (0, 1))
    g                          = -log(-log(u))                            (standard Gumbel)

mix32 is Chris Wellons' "lowbias32" integer finaliser (a bijection on uint32 with low bias). The torch
version works on int32 with two's-complement wrap-around and masks after arithmetic right shifts, so its
bits equal the uint32 arithmetic of the Triton version exactly; `u` is then exact in fp32 on both sides.
The sampler returns the first argmax over allowed tokens of x - log(-log(u)) with x = logits.float() * (1 / T),
the same fp32 operations on both backends (Gumbel-max: a draw from softmax(x) renormalised over the allowed
set). The backends can disagree only when two scores tie within the last-bit differences of their `log`s.
"""
import math

import torch

MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
KEY_SALT = 0x9E3779B9
U_SCALE = 2.0 ** -24
# u <= 1 - 2**-24 bounds the noise from above (the torch path prunes tokens that cannot win).
GUMBEL_MAX = -math.log(-math.log1p(-U_SCALE))

_MASK32 = 0xFFFFFFFF


def _as_int32(mul: int) -> int:
    return mul - (1 << 32) if mul >= 1 << 31 else mul


def mix32_(h: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor (wrap-around multiply, logical shifts via masks)."""
    tmp = torch.empty_like(h) if tmp is None else tmp
    for shift, mul in ((16, MIX_MUL1), (15, MIX_MUL2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=tmp)
        tmp.bitwise_and_((1 << (32 - shift)) - 1)
        h.bitwise_xor_(tmp)
        if mul is not None:
            h.mul_(_as_int32(mul))
    return h


def _mix32_int64(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (host-side key mixing)."""
    h = h & _MASK32
    h = h ^ (h >> 16)
    h = (h * MIX_MUL1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * MIX_MUL2) & _MASK32
    return h ^ (h >> 16)


def row_keys(seeds: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-row 32-bit noise keys (returned as int32) from int64 seed, sequence id and position tensors [B]."""
    h = _mix32_int64((seeds & _MASK32) ^ KEY_SALT)
    h = _mix32_int64(h ^ ((seeds >> 32) & _MASK32))
    h = _mix32_int64(h ^ (seq_ids & _MASK32) ^ (((seq_ids >> 32) & _MASK32) * KEY_SALT))
    h = _mix32_int64(h ^ (positions & _MASK32))
    return torch.where(h >= 1 << 31, h - (1 << 32), h).to(torch.int32)


def uniform_bits_(bits: torch.Tensor) -> torch.Tensor:
    """Map mixed int32 bits in place to the integer numerator n of u = n * 2**-24 (n odd, 0 < n < 2**24)."""
    return bits.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).bitwise_or_(1)


def gumbel(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Reference Gumbel noise g(key, token) for broadcastable int32 keys and int token ids (float32)."""
    bits = torch.bitwise_xor(keys.to(torch.int32), token_ids.to(torch.int32))
    u = uniform_bits_(mix32_(bits)).to(torch.float32) * U_SCALE
    return -torch.log(-torch.log(u))
