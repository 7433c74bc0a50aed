"""Online softmax-entropy accumulators shared by the Triton kernels.

Over the tiles of a row keep m = max x, z = sum exp(x - m) and s = sum exp(x - m) * (x - m); then
logsumexp = m + log z and entropy = log z - s / z. Every term of s has the same sign, so nothing cancels;
-inf logits contribute nothing.
"""
import triton
import triton.language as tl


@triton.jit
def online_entropy_update(m, z, s, x):
    """Fold a tile x (float32, -inf for padding) into the accumulators (m, z, s)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    shifted = x - m_ref
    e = tl.exp(shifted)
    s = (s + z * (tl.where(z > 0, m, m_ref) - m_ref)) * alpha + tl.sum(e * tl.where(e > 0, shifted, 0.0), axis=0)
    z = z * alpha + tl.sum(e, axis=0)
    return m_new, z, s
