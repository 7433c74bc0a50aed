"""Registers ETTRL's pieces in verl's registries; imported by every `import verl` (entry point `verl.plugins`).

verl swallows a plug-in's import error (it logs it at debug level), so a refused version is also logged as a
warning here; importing `ettrl.integrations.verl` yourself raises it.
"""
from __future__ import annotations

import logging

PINNED_VERL = "0.9.1"
ROLLOUT_NAME = "ettrl"
ADAPTER_PATH = "ettrl.integrations.verl.adapter.EttrlServerAdapter"

log = logging.getLogger("ettrl.integrations.verl")


def check_verl_version(found: str | None = None) -> None:
    """Raises ImportError naming both versions unless verl is the one this integration was written against: it
    reaches into verl's registries (one of them private) and its batch layout, which change between releases."""
    if found is None:
        import verl
        found = verl.__version__
    if found != PINNED_VERL:
        message = (f"ettrl.integrations.verl was written and tested against verl {PINNED_VERL}, but verl {found} is "
                   f"installed: pip install 'verl=={PINNED_VERL}' (or pip install 'ettrl[verl]')")
        log.warning(message)
        raise ImportError(message)


def _register_rollout():
    """The one place that writes verl's private _ROLLOUT_REGISTRY: verl 0.9.1 offers no public call for the
    worker-side class of a rollout backend (get_rollout_class looks the (name, mode) key up as a dotted path)."""
    from verl.workers.rollout import base

    base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = ADAPTER_PATH


def _load_replica():
    from ettrl.integrations.verl.replica import EttrlReplica
    return EttrlReplica


def _register_checkpoint_engine():
    from verl.checkpoint_engine import CheckpointEngineRegistry

    from ettrl.integrations.verl.checkpoint_engine import GlooCheckpointEngine

    existing = CheckpointEngineRegistry._registry.get("gloo")
    if existing is not None and existing is not GlooCheckpointEngine:
        message = (f"verl already registers a checkpoint engine named 'gloo' ({existing.__module__}."
                   f"{existing.__qualname__}); ettrl's GlooCheckpointEngine would replace it, so it is not registered:"
                   f" use verl's, or remove one of them")
        log.warning(message)
        raise RuntimeError(message)
    CheckpointEngineRegistry.register("gloo")(GlooCheckpointEngine)


def _register_reward_manager():
    from verl.experimental.reward_loop.reward_manager import register as register_reward_manager

    from ettrl.integrations.verl.reward import REWARD_MANAGER_NAME, EttrlMajorityRewardManager

    register_reward_manager(REWARD_MANAGER_NAME)(EttrlMajorityRewardManager)


def _register_advantage_estimators():
    from verl.trainer.ppo.core_algos import register_adv_est

    from ettrl.integrations.verl.advantage import ESTIMATORS

    for name, fn in ESTIMATORS.items():
        register_adv_est(name)(fn)


def register() -> None:
    """Idempotent: each registry accepts the same object again."""
    check_verl_version()
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    _register_rollout()
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    _register_checkpoint_engine()
    _register_reward_manager()
    _register_advantage_estimators()


register()
