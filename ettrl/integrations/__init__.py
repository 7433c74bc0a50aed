"""Hooks that let other RL trainers use the engine (optional dependencies: `pip install 'ettrl[trl]'`)."""
