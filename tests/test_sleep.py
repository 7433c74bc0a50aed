"""LLM.sleep() / wake_up(): the KV pool's memory goes back to the OS and generation afterwards is unchanged."""
import gc
import os
import weakref

import pytest
import torch

from engine import LLM, SamplingParams
from tiny_models import make_tiny_model

PARAMS = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, n=3, seed=5, ignore_eos=True)
PROMPTS = [list(range(10, 30)), list(range(40, 47))]
POOL_GB = 0.125


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tokens(llm):
    return [[o.token_ids for o in r.outputs] for r in llm.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    make_tiny_model("qwen2", path)
    return LLM(path, dtype="float32", device="cpu", block_size=4, kv_cache_memory_gb=POOL_GB)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="no /proc (needed to read the resident size)")
def test_sleep_returns_the_pool_and_wake_up_generates_the_same(llm):
    before = tokens(llm)
    runner = llm.engine.runner
    pool = [weakref.ref(t) for t in (runner.kv.k, runner.kv.v, runner.attn.k_slots, runner.attn.v_slots)]
    num_blocks = runner.kv.num_blocks
    gc.collect()
    awake = rss_bytes()
    llm.sleep()
    gc.collect()
    assert all(ref() is None for ref in pool)
    assert awake - rss_bytes() > 0.8 * POOL_GB * 2**30  # the pool's pages went back to the OS
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(PROMPTS, PARAMS)
    llm.wake_up()
    assert llm.engine.kv is runner.kv and llm.engine.scheduler.kv is runner.kv
    assert runner.kv.num_blocks == num_blocks
    assert tokens(llm) == before
    llm.check_integrity()


def test_sleep_level_2_and_weights_written_while_asleep(llm):
    before = tokens(llm)
    state = {name: t.clone() for name, t in llm.engine.runner.model.hf_parameter_views().items()}
    llm.sleep(level=2)
    llm.sleep(level=2)  # asleep already: nothing to do
    assert llm.update_weights(state) == len(state)
    llm.wake_up()
    llm.wake_up()  # awake already
    assert tokens(llm) == before


def test_sleep_with_requests_in_flight_is_refused(llm):
    seq = llm.engine.make_sequences(PROMPTS[0], PARAMS)[0]
    llm.engine.add_sequence(seq)
    llm.engine.step()
    with pytest.raises(RuntimeError, match="live sequences"):
        llm.sleep()
    for s in [seq, *seq.pending_siblings, *llm.engine.live_sequences()]:
        llm.engine.free(s)
    with pytest.raises(ValueError, match="level"):
        llm.sleep(level=3)
    llm.sleep()
    llm.wake_up()
    llm.check_integrity()


def test_cuda_is_the_default_device_only_where_torch_sees_one(monkeypatch):
    from engine import EngineConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert EngineConfig(model="m").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert EngineConfig(model="m").device == "cuda"
    assert EngineConfig(model="m", device="cpu").device == "cpu"
    import inspect
    assert inspect.signature(LLM).parameters["device"].default == "auto"
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model="m", device="cpu", gpu_memory_utilization=1.5)


def test_gpu_memory_utilization_budget_arithmetic():
    """vLLM's meaning: the engine holds at most utilization * total (weights + activations + KV pool)."""
    from engine.gpu_memory import kv_budget_bytes
    gib = 2**30
    assert kv_budget_bytes(80 * gib, 70 * gib, 0.5, 3 * gib, 2 * gib) == 35 * gib
    with pytest.raises(ValueError, match="already fill"):
        kv_budget_bytes(80 * gib, 70 * gib, 0.05, 3 * gib, 2 * gib)
    with pytest.raises(ValueError, match="only 10.00 GiB of the GPU are free"):
        kv_budget_bytes(80 * gib, 10 * gib, 0.5, 3 * gib, 2 * gib)


def test_activation_estimate_counts_tokens_and_logits():
    from engine.gpu_memory import ATTENTION_WORKSPACE_BYTES, activation_bytes
    from engine.models.registry import model_spec
    from tiny_models import CONFIGS
    hf = CONFIGS["qwen2"]().to_dict()
    args = model_spec(hf).parse_args(hf)
    small = activation_bytes(args, 64, 8, torch.bfloat16)
    assert activation_bytes(args, 128, 8, torch.bfloat16) > small > ATTENTION_WORKSPACE_BYTES
    assert activation_bytes(args, 64, 8, torch.float32) > small


# ---- wake_up tags (vLLM's: "weights", "kv_cache"; None = both, weights first) and the memory re-check ---------------
def test_wake_up_tags_bring_weights_back_before_the_pool(llm):
    """Level 2 with the weights really moved (host to host here: on a GPU they go to pinned memory): the pool and
    the weights wake separately, and a trainer may write weights between the two."""
    before = tokens(llm)
    runner = llm.engine.runner
    runner.offloads_weights = True
    try:
        embed = runner.model.hf_parameter_views()["model.embed_tokens.weight"]
        address, values = embed.data_ptr(), embed.detach().clone()
        state = {name: t.clone() for name, t in runner.model.hf_parameter_views().items()}
        llm.sleep(level=2)
        assert runner.weights_offloaded and llm.engine.asleep
        assert embed.data_ptr() != address and torch.equal(embed, values)
        llm.wake_up(["kv_cache"])
        assert not llm.engine.asleep and llm.engine.scheduler.kv is runner.kv
        with pytest.raises(RuntimeError, match=r"offloaded.*wake_up\(\['weights'\]\)"):
            llm.generate(PROMPTS, PARAMS)
        llm.wake_up(["weights"])
        assert not runner.weights_offloaded and tokens(llm) == before

        llm.sleep(level=2)
        llm.wake_up(["weights"])  # the trainer's order: weights, new weights written, then the pool
        assert llm.engine.asleep and not runner.weights_offloaded
        assert llm.update_weights(state) == len(state)
        llm.wake_up(["kv_cache"])
        assert tokens(llm) == before
        llm.sleep(level=1)
        llm.sleep(level=2)  # deeper while asleep: the weights go too
        assert runner.weights_offloaded
        llm.wake_up()
        assert not runner.weights_offloaded and not llm.engine.asleep and tokens(llm) == before
    finally:
        runner.offloads_weights = False
    llm.check_integrity()


def test_wake_up_tags_order_and_validation(llm, monkeypatch):
    runner = llm.engine.runner
    calls = []
    monkeypatch.setattr(runner, "wake_up_weights", lambda: calls.append("weights"))
    monkeypatch.setattr(runner, "wake_up_kv_cache", lambda: calls.append("kv_cache"))
    llm.wake_up()
    llm.wake_up(["kv_cache", "weights"])
    llm.wake_up(["kv_cache"])
    llm.wake_up([])
    assert calls == ["weights", "kv_cache", "weights", "kv_cache", "kv_cache"]
    with pytest.raises(ValueError, match=r"unknown wake_up tags \['kv'\]"):
        llm.wake_up(["kv"])
    with pytest.raises(TypeError, match="list of names"):
        llm.wake_up("weights")
    import inspect
    assert str(inspect.signature(LLM.wake_up).parameters["tags"]) == "tags: list[str] | None = None"


def test_wake_up_checks_free_memory_and_stays_asleep(llm, monkeypatch):
    """The pool (and activations, and weights still offloaded) must fit in what is free now: when it does not,
    a clear error and the engine still asleep (nothing allocated), so the caller can free memory and retry."""
    from engine import model_runner
    from engine.gpu_memory import DeviceMemoryError, activation_bytes, parameter_bytes
    runner = llm.engine.runner
    c = llm.config
    pool = runner.kv.k.numel() * runner.kv.k.element_size() * 2
    activations = activation_bytes(runner.args, c.max_num_batched_tokens, c.max_num_seqs, runner.dtype)
    weights = parameter_bytes(runner.model)
    free = {"bytes": pool + activations - 1}
    monkeypatch.setattr(model_runner, "device_free_bytes", lambda device: free["bytes"])
    llm.sleep()
    with pytest.raises(DeviceMemoryError, match=r"wake_up needs .*KV pool 0.12 GiB.*activations.*only .* free"):
        llm.wake_up()
    assert llm.engine.asleep and runner.kv is None
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(PROMPTS, PARAMS)
    free["bytes"] += 1
    llm.wake_up()
    assert not llm.engine.asleep

    runner.offloads_weights = True
    try:
        llm.sleep(level=2)
        free["bytes"] = weights - 1
        with pytest.raises(DeviceMemoryError, match="weights"):
            llm.wake_up(["weights"])
        assert runner.weights_offloaded
        free["bytes"] = pool + activations  # the pool fits, but not with the offloaded weights' room
        with pytest.raises(DeviceMemoryError, match="offloaded weights"):
            llm.wake_up(["kv_cache"])
        free["bytes"] = pool + activations + weights
        llm.wake_up()
    finally:
        runner.offloads_weights = False
    assert not llm.engine.asleep and not runner.weights_offloaded
    llm.check_integrity()
