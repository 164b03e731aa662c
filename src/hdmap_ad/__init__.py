"""HDMAP anomaly detection with Dinomaly: data, model, methods, training and statistics."""

__version__ = "0.1.0"
