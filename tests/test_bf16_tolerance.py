"""The engine in bfloat16 against transformers in bfloat16, teacher-forced over a long sequence.

The engine decodes 440 tokens greedily and records the full log-softmax at every step (logprobs = the whole
vocabulary, raw); transformers gets exactly those tokens in one forward. Both run the same bf16 weights, so they
differ only by rounding: where each rounds intermediate values to bf16 and in which order it accumulates.

The bound, in units of bf16 spacing at the position's logit scale, ulp_t = 2**(floor(log2 max_v |z_t,v|) - 7)
(bf16 keeps 8 significant bits):
- log p_v = z_v - logsumexp(z): an error of at most d in every logit moves log p_v by at most 2 d;
- each side rounds its logits to bf16 (half an ulp each: 1 ulp apart at most);
- the bf16 hidden state entering the final norm and lm_head can differ in the last bit of its components (the
  two accumulate in different orders before rounding); through the 64-wide lm_head, whose rows have about the
  logit scale as their norm times |h|, those half-ulp differences add up to a few ulps of the logit: 3 allowed;
so d <= 4 ulps and |delta log p| <= 8 ulps. Measured on these models: at most 5.2 (Llama), 4.2 (Qwen2),
2.7 (Qwen3) ulps, with a median of about 1.5, and no growth along the sequence: rounding differences do not
accumulate through the KV cache (the last quarter of the positions must meet the same bound as the first).
"""
import pytest
import torch

from engine import LLM, SamplingParams
from tiny_models import VOCAB, make_tiny_model

PROMPT = list(range(20, 52))
NEW_TOKENS = 440
ULPS = 8


def engine_log_softmax(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """(all tokens, [new_tokens, V] log-softmax the engine sampled each new token from)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=VOCAB,
                            logprobs_mode="raw_logprobs")
    engine = llm.engine
    for seq in engine.make_sequences(prompt, params):
        engine.add_sequence(seq)
    finished = []
    while not finished:
        finished = engine.step()
    seq, = finished
    out = torch.full((len(seq.top_logprobs), VOCAB), float("nan"))
    for t, (_, alternatives) in enumerate(seq.top_logprobs):
        ids, values = zip(*alternatives)
        out[t, list(ids)] = torch.tensor(values)
    return seq.token_ids, out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_bf16_log_softmax_within_8_ulps_at_every_position(kind, tmp_path):
    from transformers import AutoModelForCausalLM
    make_tiny_model(kind, tmp_path)
    llm = LLM(tmp_path, dtype="bfloat16", block_size=16, num_kv_blocks=64)
    tokens, engine_logp = engine_log_softmax(llm, PROMPT, NEW_TOKENS)
    assert engine_logp.shape == (NEW_TOKENS, VOCAB) and not engine_logp.isnan().any()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([tokens[:-1]])).logits[0, len(PROMPT) - 1:].float()
    assert logits.shape == engine_logp.shape
    ulp = 2.0 ** (torch.floor(torch.log2(logits.abs().amax(-1))) - 7)
    error = (engine_logp - torch.log_softmax(logits, -1)).abs().amax(-1) / ulp
    worst = int(error.argmax())
    assert error.max() <= ULPS, f"position {worst}: {error.max():.2f} ulps of bf16 at |z| ~ {ulp[worst] * 128:.3g}"
    assert error[-NEW_TOKENS // 4:].max() <= ULPS  # no drift along the sequence
    assert error.median() >= 0.1  # bf16 really ran (an fp32 engine would agree to ~0.01 ulp)
