"""ettrl.integrations.trl: TRL's real GRPOTrainer trains 2 steps on a tiny model on CPU with the engine as its
rollout backend (in process, and through engine.serve on 127.0.0.1); at the second rollout the engine's logits
equal the trainer's model's after its first step."""
import os

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from engine import LLM, SamplingParams, TreeParams
from ettrl.integrations.trl import _Remote, fill, make_rollout_func, prompt_groups, skip_padding
from tiny_models import make_tiny_policy, policy_byte_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
PROBE = [72, 105, 33, 32, 50, 43, 50]
ENGINE = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 512}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("trl") / "model", tied=False)


def trainer_logprobs(model, ids=PROBE):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)


def probe_engine(llm, ids=PROBE, k=8):
    seqs = llm.engine.make_sequences(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=k,
                                                         logprobs_mode="raw_logprobs"))
    llm.engine.add_sequence(seqs[0])
    while llm.engine.has_unfinished():
        for seq in llm.engine.step():
            llm.engine.free(seq)
    return seqs[0].top_logprobs[0][1]  # [(token id, logprob)] of the top k


def run_grpo(tmp_path, llm_or_url, probe, tree_params=None, num_generations=4, api_key=None):
    calls = []
    hook = make_rollout_func(llm_or_url, tree_params, api_key=api_key)

    def rollout(prompts, trainer):
        out = hook(prompts, trainer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        calls.append({"step": trainer.state.global_step, "out": out, "engine": probe(),
                      "trainer": trainer_logprobs(model),
                      "weights": model.lm_head.weight.detach().clone()})
        return out

    seen = {}

    def reward(completions, entropies, tree_origin, **kwargs):
        seen.update(entropies=entropies, tree_origin=tree_origin)
        return [float(sum(c.count(d) for d in "0123456789")) + 0.1 * len(c) for c in completions]

    data = Dataset.from_dict({"prompt": ["What is 1+1?", "What is 2+3?"]})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=num_generations,
                      max_completion_length=6, max_steps=2, learning_rate=0.05, logging_steps=1, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no", beta=0.0, seed=0, temperature=1.0,
                      dataloader_num_workers=0)
    trainer = GRPOTrainer(model=str(tmp_path / "model"), reward_funcs=skip_padding(reward), args=args,
                          train_dataset=data, processing_class=policy_byte_tokenizer(), rollout_func=rollout)
    trainer.train()
    return calls, seen


def check_weights_follow_the_trainer(calls):
    assert [c["step"] for c in calls] == [0, 1]
    assert not torch.equal(calls[0]["weights"], calls[1]["weights"])  # the first step changed the model
    assert calls[0]["engine"] != calls[1]["engine"]
    for c in calls:  # at each rollout the engine's logits are the trainer's (after the step before it)
        for token, logprob in c["engine"]:
            assert logprob == pytest.approx(float(c["trainer"][token]), abs=1e-4)


def test_grpo_trainer_two_steps_in_process(tmp_path, model_dir):
    import shutil
    shutil.copytree(model_dir, tmp_path / "model")
    llm = LLM(tmp_path / "model", **ENGINE)
    calls, seen = run_grpo(tmp_path, llm, lambda: probe_engine(llm))
    check_weights_follow_the_trainer(calls)
    out = calls[0]["out"]
    assert len(out["completion_ids"]) == 4 and all(len(ids) <= 6 for ids in out["completion_ids"])
    assert [len(lp) for lp in out["logprobs"]] == [len(ids) for ids in out["completion_ids"]]
    assert seen["entropies"] and seen["tree_origin"] == [None] * len(seen["entropies"])
    llm.check_integrity()


def test_grpo_trainer_two_steps_with_trees_through_the_server(tmp_path, model_dir):
    """The hook against engine.serve (weights pushed by /update_weights_from_tensor), trees of 1 + 1 x 3 leaves
    (entropy forks, the metric this test was written for: it needs rewards that differ within the group, or a zero
    advantage moves no weight; with surprisal forks this seed's first step moved none)."""
    import shutil

    from engine.serve.api_server import Server, ServerConfig
    from serve_util import running
    shutil.copytree(model_dir, tmp_path / "model")
    server = Server(LLM(tmp_path / "model", **ENGINE), ServerConfig("tiny", enable_weight_updates=True))

    def probe():  # on the engine loop, between requests
        return server.loop.barrier(lambda: probe_engine(server.llm)).result(timeout=60)

    with running(server.app) as url:
        calls, seen = run_grpo(tmp_path, url, probe, TreeParams(trees=1, forks=1, branches=3, metric="entropy"))
    check_weights_follow_the_trainer(calls)
    origins = seen["tree_origin"]
    assert len(origins) == 4 and origins[0] == (0, None, None)
    assert all(o[0] == 0 and o[2] in (0, 1, 2) for o in origins[1:])


def test_grpo_trainer_through_the_server_without_trees_tied_embeddings_and_an_api_key(tmp_path):
    """The /v1/completions path (_Remote.generate) against a server that needs a key, on a model whose lm_head is
    its embedding: the engine follows the trainer at each rollout, the completions' logprobs are the trainer's
    forward at T = 1, and /get_weight_version counts the two pushes."""
    import httpx

    from engine.serve.api_server import Server, ServerConfig
    from serve_util import running
    make_tiny_policy(tmp_path / "model", tied=True)
    key = "trl-key"
    server = Server(LLM(tmp_path / "model", **ENGINE), ServerConfig("tiny", enable_weight_updates=True, api_key=key))

    def probe():
        return server.loop.barrier(lambda: probe_engine(server.llm)).result(timeout=60)

    with running(server.app) as url:
        with pytest.raises(RuntimeError, match="401"):
            _Remote(url, None, 60).generate([[72, 105]], [1], SamplingParams(max_tokens=2), [0])
        calls, seen = run_grpo(tmp_path, url, probe, api_key=key)
        version = httpx.get(f"{url}/get_weight_version", headers={"Authorization": f"Bearer {key}"}).json()
    assert version == {"weight_version": "2", "weight_version_name": None}
    check_weights_follow_the_trainer(calls)
    assert seen["tree_origin"] == [None] * 4
    # after train() the server holds the weights pushed before the last rollout (not the last step's update)
    held = server.engine.runner.model.hf_parameter_views()["model.embed_tokens.weight"]
    assert torch.equal(held, calls[1]["weights"])
    out = calls[1]["out"]
    model = make_reference_model(tmp_path / "model", server)
    for prompt, completion, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].double()
        expected = torch.log_softmax(logits, -1)[range(len(completion)), completion]
        assert logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def make_reference_model(model_dir, server):
    """The trainer's model as the server holds it now (its weights read back from the engine)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    views = server.engine.runner.model.hf_parameter_views()
    model.load_state_dict({name: views[name] for name in model.state_dict() if name in views}, strict=False)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_prompt_groups_and_fill():
    assert prompt_groups(["a", "a", "b", "b", "b", "b", "a"], 2) == [("a", 2), ("b", 2), ("b", 2), ("a", 1)]
    rows = [{"token_ids": [1], "logprobs": [-1.0], "entropies": [0.5]}]
    filled = fill(rows, 3)
    assert len(filled) == 3 and not filled[0].get("padding") and filled[1]["padding"] and filled[2]["padding"]
    with pytest.raises(ValueError, match="num_generations"):
        fill(rows * 4, 3)
    reward = skip_padding(lambda completions, **kw: [1.0] * len(completions))
    assert reward(["x", "y"], padding=[False, True]) == [1.0, None]
