"""The model core: pure PyTorch model, methods, optimiser, preprocessing, inference, checkpoints,
params, devices. Imports nothing from `hdmap_ad.pipeline` or `hdmap_ad.apps`, and no mlflow, dvc or ray
(pyproject's import-linter contracts)."""
