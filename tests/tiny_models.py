"""Tiny random Hugging Face checkpoints (saved as safetensors) and a byte-level tokenizer for engine tests."""
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
