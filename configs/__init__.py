"""Hydra configs: model/, parallel/, data/, train/, logging/ groups and the top-level presets."""
