"""NPGMF anomaly detection engine: logical + structural branches, fused into one anomaly map."""

__version__ = "0.1.0"
