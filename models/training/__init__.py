"""Training and evaluation: the loop, its losses, the synthetic dataset, and the metrics.

Serving never imports this package: `models/`, `index/` and the server stand without it; only
the CLI's `train`, `eval` and `synth` commands load it.
"""
