"""Tiny random Hugging Face checkpoints (saved as safetensors) and byte-level tokenizers, for every test.

Engine tests: make_tiny_model(kind, dir) (Llama / Qwen2 / Qwen3, vocab 300, byte ids = byte values) and the
transformers references hf_greedy / hf_token_stats. Trainer tests: make_tiny_policy(dir) (a Llama with vocab 258
and a chat-style byte tokenizer, optionally favouring some characters) and make_tiny_task(root) (it plus a data set).
"""
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

VOCAB = 300
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.2,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama_tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama3_rope": lambda: LlamaConfig(**COMMON, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
}


def make_tiny_model(kind: str, directory: Path, seed: int = 0, max_shard_size: str | None = None,
                    tokenizer: bool = False):
    """Saves a random model of `kind` in `directory`; returns the fp32 transformers model (eval, greedy config)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]()).float().eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    if tokenizer:
        byte_tokenizer().save_pretrained(directory)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def byte_tokenizer():
    """Byte-level tokenizer: ids 0..255 are bytes, 256 is <eos>; fits the tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers generate(do_sample=False) on a left-padded batch."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens)
    return out[:, width:].tolist()


@torch.no_grad()
def hf_token_stats(model, prompt: list[int], completion: list[int], temperature: float):
    """Reference per-token (logprob, entropy) of `completion` under softmax(logits / T) from one HF forward."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1:-1].float() / (temperature or 1.0)
    logp = torch.log_softmax(logits, -1)
    logprobs = logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
    entropies = -(logp.exp() * logp).sum(-1)
    return logprobs, entropies


# --- trainer tests: a tiny policy with an <|endoftext|> / <|pad|> byte tokenizer, and a task for it ---

def policy_byte_tokenizer():
    """Byte-level tokenizer of the trainer tests' policy: the 256 byte characters in sorted order, then
    <|endoftext|> (256, EOS) and <|pad|> (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # alphabet() is unordered
    for i, special in enumerate(["<|endoftext|>", "<|pad|>"]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def make_tiny_policy(path: Path, seed: int = 0, tied: bool = True, favour: str = "", strength: float = 0.0) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with policy_byte_tokenizer, saved in `path`. `favour`: characters
    (plus EOS) the model prefers by `strength` (untied head only): every embedding shares a direction u that
    survives the residual stream, and those tokens' output rows point along u."""
    from transformers import LlamaForCausalLM

    gen = torch.Generator().manual_seed(seed)
    tokenizer = policy_byte_tokenizer()
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
    """root/model (a tiny policy that favours digits) and root/<data_file> ("What is i + i?" problems)."""
    make_tiny_policy(root / "model", tied=False, favour="0123456789", strength=6.0)
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(num_problems)]
    (root / data_file).write_text("\n".join(json.dumps(r) for r in rows))
    return root
