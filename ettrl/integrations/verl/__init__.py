"""The engine as verl's rollout backend (`actor_rollout_ref.rollout.name=ettrl`), and ETTRL's pieces as verl plug-ins.

`pip install 'ettrl[verl]'` installs the verl and Ray versions this was written and tested against. Every
`import verl` then imports `ettrl.integrations.verl.plugin` (the `verl.plugins` entry point), in Ray workers too,
which registers:

    rollout "ettrl"                 EttrlServerAdapter (in the rollout worker: the engine.LLM and its HTTP routes),
                                    EttrlReplica (verl places and balances it as vLLM's), EttrlHttpServer (its actor)
    checkpoint engine "gloo"        GlooCheckpointEngine: trainer -> rollout weights over gloo (CPU; no cupy)
    reward manager "ettrl_majority" TTRL's majority vote over each uid group, reward = agreement with the label
    advantage estimators            "ettrl_res" (EAR Adv-Res) and "ettrl_clip" (EAR Adv-Clip) on GRPO advantages

EttrlAgentLoopManager (`rollout.agent.agent_loop_manager_class=ettrl.integrations.verl.EttrlAgentLoopManager`)
samples one ETMR tree set per prompt group on the least-loaded replica (tree sizes under
`rollout.engine_kwargs.ettrl`). docs/integrations.md has a full config and what was tested where.
"""
from __future__ import annotations

from ettrl.integrations.verl.plugin import PINNED_VERL, check_verl_version, register

__all__ = ["PINNED_VERL", "check_verl_version", "register", "EttrlServerAdapter", "EttrlHttpServer", "EttrlReplica",
           "EttrlAgentLoopManager", "EttrlMajorityRewardManager", "GlooCheckpointEngine", "EttrlRolloutOptions"]

_LAZY = {
    "EttrlServerAdapter": "ettrl.integrations.verl.adapter",
    "EttrlHttpServer": "ettrl.integrations.verl.server",
    "EttrlReplica": "ettrl.integrations.verl.replica",
    "EttrlAgentLoopManager": "ettrl.integrations.verl.agent_loop",
    "EttrlMajorityRewardManager": "ettrl.integrations.verl.reward",
    "GlooCheckpointEngine": "ettrl.integrations.verl.checkpoint_engine",
    "EttrlRolloutOptions": "ettrl.integrations.verl.options",
}


def __getattr__(name: str):
    """The classes load on first use, so that `import verl` (which imports the plug-in) stays light."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
