"""Edits of a run: interventions (easyroutine's hooks), patching grids, gradients through hook
points (attribution patching), TransformerLens 4.3's node/edge attribution patching with
faithfulness and its subspace interchange interventions, easyroutine extraction, and
TransformerLens's stateful hook points. Submodules: `interventions`, `patching`, `gradients`,
`edge_attribution`, `interchange`, `extraction`, `hook_points`."""

__all__: list[str] = []
