"""ettrl.rollout: the fields of each Response come from the engine's output, and the engine gets the config's
sampling parameters; on a tiny model the entropies are the policy's full-vocabulary entropies (transformers)."""
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from ettrl.config import Config
from ettrl.data import Problem
from ettrl.grading import BOXED_ANSWER_REGEX
from ettrl.rollout import rollout, sampling_params

PROBLEMS = [Problem("What is 1 + 1?", "2"), Problem("What is 2 + 2?", "4")]
PROMPTS = [[5, 6, 7], [8, 9]]


def completion(j: int, prompt: int):
    # entropies and -logprobs differ everywhere, so a swap of the two shows
    n = j + 1
    return SimpleNamespace(token_ids=[10 * prompt + j] * n, text=f"p{prompt} s{j}", logprobs=[-0.1 * (j + 1)] * n,
                           entropies=[0.5 + j + 0.01 * t for t in range(n)],
                           finish_reason="length" if j == 1 else "stop")


@dataclass
class FakeLLM:
    calls: list = field(default_factory=list)
    progress: list = field(default_factory=list)  # use_tqdm of each call

    def generate(self, prompts, params, *, use_tqdm):  # no default: rollout must pass its progress flag
        self.calls.append(("generate", prompts, params))
        self.progress.append(use_tqdm)
        return [SimpleNamespace(outputs=[completion(j, i) for j in range(p.n)]) for i, p in enumerate(params)]

    def sample_tree(self, prompts, tree_params, params, *, use_tqdm):
        self.calls.append(("tree", prompts, tree_params, params))
        self.progress.append(use_tqdm)
        return [SimpleNamespace(leaves=[SimpleNamespace(**vars(completion(j, i)), root=j // 2) for j in range(3)],
                                stats=SimpleNamespace(decoded_tokens=4 + i)) for i in range(len(prompts))]


def config(method="ttrl") -> Config:
    cfg = Config(method=method)
    cfg.rollout.n_votes = 3
    cfg.rollout.temperature = 0.7
    cfg.rollout.top_p = 0.9
    cfg.rollout.max_tokens = 12
    cfg.rollout.trees, cfg.rollout.forks, cfg.rollout.branches = 2, 3, 4
    cfg.rollout.fork_metric = "surprisal"
    cfg.rollout.distinct = True
    cfg.rollout.no_fork_after = ["\\boxed{", "Final"]
    cfg.rollout.min_gap = 3
    return cfg


def check_responses(groups):
    assert [g.problem for g in groups] == PROBLEMS and [g.prompt_ids for g in groups] == PROMPTS
    for i, g in enumerate(groups):
        for j, r in enumerate(g.responses):
            src = completion(j, i)
            assert r.token_ids == src.token_ids and r.text == src.text and r.finish_reason == src.finish_reason
            assert r.entropies == src.entropies
            assert all(isinstance(h, float) for h in r.entropies) and isinstance(r.token_ids, list)


def test_parallel_rollout_fields_and_params():
    llm = FakeLLM()
    groups = rollout(llm, PROBLEMS, PROMPTS, config(), ["\n\n"], seed=41)
    check_responses(groups)
    assert [len(g.responses) for g in groups] == [3, 3]
    assert [g.decoded_tokens for g in groups] == [1 + 2 + 3] * 2
    (kind, prompts, params), = llm.calls
    assert kind == "generate" and prompts == PROMPTS
    assert [(p.n, p.temperature, p.top_p, p.max_tokens, p.stop) for p in params] == [(3, 0.7, 0.9, 12, ["\n\n"])] * 2
    assert [p.seed for p in params] == [41, 42]  # each prompt its own noise
    assert all(r.tree is None for g in groups for r in g.responses)  # each parallel sample its own stratum


def test_tree_rollout_fields_and_params():
    llm = FakeLLM()
    groups = rollout(llm, PROBLEMS, PROMPTS, config("ettrl"), ["</s>"], seed=2**63 - 1)
    check_responses(groups)
    assert [g.decoded_tokens for g in groups] == [4, 5]  # what the engine decoded, not the leaves' lengths
    (kind, prompts, tree, params), = llm.calls
    assert kind == "tree" and prompts == PROMPTS
    assert (tree.trees, tree.forks, tree.branches, tree.metric, tree.distinct) == (2, 3, 4, "surprisal", True)
    assert (tree.no_fork_after, tree.min_gap) == (["\\boxed{", "Final"], 3)
    assert [[r.tree for r in g.responses] for g in groups] == [[0, 0, 1]] * 2  # each leaf's root
    assert [(p.n, p.temperature, p.top_p, p.max_tokens, p.stop) for p in params] == [(1, 0.7, 0.9, 12, ["</s>"])] * 2
    assert [p.seed for p in params] == [2**63 - 1, 0]  # wraps below 2**63


def test_progress_is_off_by_default_and_reaches_the_engines_bar():
    llm = FakeLLM()
    for method in ("ttrl", "ettrl"):
        rollout(llm, PROBLEMS, PROMPTS, config(method), [], seed=0)
        rollout(llm, PROBLEMS, PROMPTS, config(method), [], seed=0, progress=True)
    assert [kind for kind, *_ in llm.calls] == ["generate", "generate", "tree", "tree"]
    assert llm.progress == [False, True, False, True] and all(type(p) is bool for p in llm.progress)


def test_sampling_params_carry_the_config():
    cfg = config()
    p = sampling_params(cfg.rollout, ["x"], seed=3, n=5)
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.stop, p.seed) == (5, 0.7, 0.9, 12, ["x"], 3)
    assert (p.stop_regex, p.include_stop_str_in_output) in (([], False), (None, False))  # stop_at_answer's default
    cfg.rollout.stop_at_answer = True
    p = sampling_params(cfg.rollout, ["x"], seed=3, n=5)
    assert (p.stop_regex, p.include_stop_str_in_output) == ([BOXED_ANSWER_REGEX], True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine import LLM
    from tiny_models import make_tiny_model
    path = tmp_path_factory.mktemp("rollout_llama")
    model = make_tiny_model("llama", path, tokenizer=True)
    return model, LLM(path, dtype="float32", block_size=4, num_kv_blocks=512)


@pytest.mark.parametrize("method", ["ttrl", "ettrl"])
def test_engine_responses_carry_the_policys_entropies(tiny, method):
    """Each response's entropies are the full-vocabulary entropies of softmax(logits / T) at its tokens (the
    signal EAR and the fork selection read), not its surprisals -log p."""
    from tiny_models import hf_token_stats
    model, llm = tiny
    cfg = config(method)
    cfg.rollout.top_p, cfg.rollout.max_tokens = 1.0, 6
    cfg.rollout.trees, cfg.rollout.forks, cfg.rollout.branches = 2, 1, 1
    groups = rollout(llm, PROBLEMS, PROMPTS, cfg, [], seed=9)
    for g in groups:
        assert len(g.responses) == (cfg.n_votes if method == "ttrl" else 4)
        for r in g.responses:
            assert len(r.token_ids) == len(r.entropies) == 6 and r.finish_reason == "length"
            logp, h = hf_token_stats(model, g.prompt_ids, r.token_ids, cfg.rollout.temperature)
            torch.testing.assert_close(torch.tensor(r.entropies), h, rtol=1e-4, atol=1e-4)
            assert (h - (-logp)).abs().max() > 0.1


def test_resolve_device_and_make_llm(tmp_path, monkeypatch):
    from ettrl.rollout import make_llm, resolve_device
    assert resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.undo()
    from tiny_models import make_tiny_model
    make_tiny_model("llama", tmp_path, tokenizer=True)
    llm, tokenizer = make_llm(str(tmp_path), dtype="bfloat16", device="cpu", num_kv_blocks=32, block_size=8)
    assert (llm.config.dtype, llm.config.device, llm.config.num_kv_blocks, llm.config.block_size) == \
        ("bfloat16", "cpu", 32, 8)
    assert tokenizer.decode(tokenizer("ab").input_ids) == "ab"


def test_make_llm_defaults_to_the_devices_dtype(tmp_path, monkeypatch):
    """make_llm passes the resolved device and dtype to LLM: auto is float32 on the CPU, bfloat16 on CUDA."""
    import transformers

    import engine
    import engine.model_files
    from ettrl.rollout import make_llm
    made = []
    monkeypatch.setattr(engine.model_files, "resolve_model", lambda spec: tmp_path / "resolved")
    monkeypatch.setattr(engine, "LLM", lambda path, **kw: made.append((path, kw)) or "llm")
    monkeypatch.setattr(transformers, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda path: ("tok", path)))
    resolved = str(tmp_path / "resolved")
    for cuda, device, dtype in ((False, "cpu", "float32"), (True, "cuda", "bfloat16")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert make_llm("some/model", block_size=8) == ("llm", ("tok", resolved))
        assert made.pop() == (resolved, {"dtype": dtype, "device": device, "block_size": 8})
    assert make_llm("some/model", dtype="bfloat16", device="cpu")[0] == "llm"
    assert made.pop() == (resolved, {"dtype": "bfloat16", "device": "cpu"})
