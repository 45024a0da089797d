"""Applications built on the library: the CLI (`cli`), the demo and its HTML report
(`demo`, `report`), the shipped model's training data and probes (`data`, `probes`), and
the export of a trained model as a HF GPT-2 checkpoint (`export`). Nothing in the runtime
library imports from here."""

__all__: list[str] = []
