"""Pins for what the ablation and study reports show a reader (the survivors of the reports' mutation pass,
docs/reliability.md): numbers read back from the written files and figures, checked against hand computations."""
