"""ETTRL rollout engine: paged KV cache, radix-tree prefix sharing, continuous batching, tree sampling."""
