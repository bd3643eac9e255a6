"""Encoders (open_clip), the CoCa caption-decoder re-ranker, training and evaluation.

Nothing heavy is imported here: torch and open_clip load when a submodule needs them.
"""
