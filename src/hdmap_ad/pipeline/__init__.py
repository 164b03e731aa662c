"""The pipeline stages and what they share: data, synthetic data, training, evaluation, metrics,
plots, MLflow tracking, statistics, the servable model. Imports `hdmap_ad.core`, never `hdmap_ad.apps`."""
