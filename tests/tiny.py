"""A tiny random Llama (2 layers, hidden 64) with a byte-level tokenizer, saved as an HF directory."""
from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # alphabet() is unordered
    for i, special in enumerate(["<|endoftext|>", "<|pad|>"]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def make_tiny_model(path: Path, seed: int = 0, tied: bool = True, favour: str = "", strength: float = 0.0) -> Path:
    """`favour`: characters (plus EOS) the model prefers by `strength` (untied head only): every embedding
    shares a direction u that survives the residual stream, and those tokens' output rows point along u."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gen = torch.Generator().manual_seed(seed)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tied, bos_token_id=None, eos_token_id=256, pad_token_id=257)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so that distributions are far from uniform
        for p in model.parameters():  # from our own generator: the same weights in every process
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        if favour and not tied:
            u = torch.nn.functional.normalize(torch.randn(config.hidden_size, generator=gen), dim=0)
            model.model.embed_tokens.weight += 3 * u
            ids = tokenizer(favour, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            model.lm_head.weight[ids] += strength * u
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return Path(path)


def make_tiny_task(root: Path, num_problems: int = 6, data_file: str = "problems.jsonl") -> Path:
    """root/model (a tiny Llama that favours digits) and root/<data_file> ("What is i + i?" problems)."""
    import json

    make_tiny_model(root / "model", tied=False, favour="0123456789", strength=6.0)
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(num_problems)]
    (root / data_file).write_text("\n".join(json.dumps(r) for r in rows))
    return root
