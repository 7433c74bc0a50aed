"""One full step of every method on a tiny random model: the step lowers the GRPO loss it optimised, the
weights move, and afterwards the engine's log-probabilities equal the trainer's (the sync worked)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine import SamplingParams  # noqa: E402
from ettrl.config import load_config  # noqa: E402
from ettrl.loss import grpo_loss  # noqa: E402
from ettrl.methods import METHODS  # noqa: E402
from ettrl.policy import load_policy, pad_batch, response_stats  # noqa: E402
from ettrl.trainer import Trainer  # noqa: E402
from tiny_models import make_tiny_task  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_task(root)
    return root


def tiny_config(root: Path, method: str, *extra: str):
    return load_config(None, [
        f"model.name={root / 'model'}", f"data.train={root / 'problems.jsonl'}", "data.eval=", "data.prompt=plain",
        f"method={method}", "rollout.n_votes=6", "rollout.n_train=4", "rollout.max_tokens=24",
        "rollout.temperature=1.0",
        "rollout.trees=2", "rollout.forks=1", "rollout.branches=2", "rollout.last_number_fallback=true",
        "trainer.prompts_per_step=2", "trainer.micro_batch_size=3", "trainer.max_steps=3", "trainer.lr=1e-5",
        "trainer.warmup_ratio=0", *extra])


def surrogate(model, samples, temperature, logp_old=None):
    """The GRPO loss of the samples in one batch (no micro-batching), and the log-probs it used."""
    batch = pad_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples], 0, "cpu")
    with torch.no_grad():
        logp = response_stats(model, batch, temperature)[0]
    split = lambda t: torch.nn.utils.rnn.pad_sequence(list(torch.split(t, batch["lengths"])), batch_first=True)  # noqa
    mask = split(torch.ones_like(logp))
    adv = split(torch.tensor([a for s in samples for a in s.advantages]))
    old = logp if logp_old is None else logp_old
    return grpo_loss(split(logp), split(old), adv, mask)[0].item(), logp


@pytest.mark.parametrize("method", list(METHODS))
def test_one_step_of_each_method(workdir, tmp_path, method):
    trainer = Trainer(tiny_config(workdir, method), tmp_path)
    samples, per_prompt, _ = trainer.collect(0)
    assert len(samples) == 2 * 4 and all(len(s.advantages) == len(s.response_ids) for s in samples)
    assert any(a != 0 for s in samples for a in s.advantages), "this seed must give a learning signal"
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    loss_before, logp_old = surrogate(trainer.model, samples, 1.0)

    metrics = trainer.update(samples)

    loss_after, _ = surrogate(trainer.model, samples, 1.0, logp_old)
    assert loss_after < loss_before, "the update must descend the loss it optimised"
    assert metrics["grad_norm"] > 0 and abs(metrics["loss"] - loss_before) < 1e-5
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.named_parameters())
    _engine_matches_trainer(trainer, workdir)


def _engine_matches_trainer(trainer, workdir):
    prompt = trainer.train_ids[0]
    out = trainer.llm.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5))[0].outputs
    batch = pad_batch([prompt] * len(out), [o.token_ids for o in out], 0, "cpu")
    with torch.no_grad():
        logp, entropy = response_stats(trainer.model, batch, 1.0)
        stale = response_stats(load_policy(workdir / "model")[0], batch, 1.0)[0]
    engine_logp = torch.tensor([x for o in out for x in o.logprobs])
    engine_entropy = torch.tensor([x for o in out for x in o.entropies])
    torch.testing.assert_close(engine_logp, logp, atol=2e-4, rtol=0)
    torch.testing.assert_close(engine_entropy, entropy, atol=2e-4, rtol=0)
    assert (stale - logp).abs().max() > 1e-3, "the trained weights differ from the initial ones"


def test_full_train_step_logs_a_record(workdir, tmp_path):
    trainer = Trainer(tiny_config(workdir, "ttrl"), tmp_path)
    record = trainer.train_step()
    assert record["step"] == 1 and trainer.step == 1
    for key in ("reward", "majority_ratio", "label_acc", "entropy", "rollout_tokens", "rollout_s", "update_s",
                "loss", "lr"):
        assert key in record
    assert record["rollout_tokens"] == record["rollout_tokens_total"] > 0


def test_eval_before_can_be_skipped(workdir, tmp_path):
    """eval.before=false (a sweep's runs that share a seed's score before training): only the eval after runs."""
    cfg = tiny_config(workdir, "ttrl", f"data.eval={workdir / 'problems.jsonl'}", "data.eval_size=2", "eval.k=2",
                      "eval.max_tokens=4", "trainer.max_steps=1", "eval.before=false")
    summary = Trainer(cfg, tmp_path).fit()
    assert summary["before"] is None and summary["after"]["eval_problems"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [1]


def test_engine_is_built_from_the_engine_section(workdir, tmp_path):
    """Every engine.* key reaches LLM(...); dtype auto is float32 on the CPU (bfloat16 on CUDA: test_config)."""
    trainer = Trainer(tiny_config(workdir, "ttrl", "engine.block_size=8", "engine.num_kv_blocks=96",
                                  "engine.max_num_seqs=5", "engine.enable_prefix_caching=false"), tmp_path)
    c = trainer.llm.config
    assert (c.dtype, c.device, c.block_size, c.num_kv_blocks, c.max_num_seqs, c.enable_prefix_caching) == \
        ("float32", "cpu", 8, 96, 5, False)
    assert trainer.llm.engine.kv.num_blocks == 96


class SleepyEngine:
    def __init__(self, wake_error=None):
        self.calls, self.wake_error = [], wake_error

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))
        if self.wake_error is not None:
            raise self.wake_error

    def update_weights(self, named_tensors):
        self.calls.append(("update_weights",))


def test_a_failed_update_is_not_hidden_by_the_wake_up_after_it(monkeypatch):
    """The update raises, then waking the engine fails too (its memory is held): the update's error is the one
    raised, the wake-up's is a note on it; without an update error the wake-up's error is raised."""
    from types import SimpleNamespace

    import ettrl.trainer as trainer_module
    from engine.gpu_memory import DeviceMemoryError

    def failing_update(*args, **kwargs):
        raise FloatingPointError("the update's own error")

    this = SimpleNamespace(sleep_engine=True, llm=SleepyEngine(DeviceMemoryError("wake_up needs 3 GiB")),
                           cfg=SimpleNamespace(trainer=None, rollout=SimpleNamespace(temperature=1.0)),
                           backend=SimpleNamespace(full_state_dict=dict), pad_id=0, ref_model=None, rank=0,
                           mini_batches=1)
    monkeypatch.setattr(trainer_module, "policy_update", failing_update)
    with pytest.raises(FloatingPointError, match="own error") as caught:
        Trainer.update(this, [])
    assert caught.value.__notes__ == ["and the engine could not wake up after it: DeviceMemoryError: wake_up needs "
                                      "3 GiB"]
    assert this.llm.calls == [("sleep", 1), ("wake_up", None)]
    monkeypatch.setattr(trainer_module, "policy_update", lambda *args, **kwargs: {"loss": 0.5})
    with pytest.raises(DeviceMemoryError, match="3 GiB"):
        Trainer.update(this, [])
    this.llm = SleepyEngine()
    assert Trainer.update(this, []) == {"loss": 0.5}
    assert this.llm.calls == [("sleep", 1), ("update_weights",), ("wake_up", None)]
