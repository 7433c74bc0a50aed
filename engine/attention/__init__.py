"""Paged-attention backends behind one interface (base.py), chosen by name or by device (registry.py)."""
