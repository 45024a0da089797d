"""Edits of a run: interventions (easyroutine's hooks), patching grids, gradients through
hook points (attribution patching), easyroutine extraction, and TransformerLens's stateful
hook points. Submodules: `interventions`, `patching`, `gradients`, `extraction`, `hook_points`."""

__all__: list[str] = []
