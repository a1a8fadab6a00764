"""Evaluation: the exact MVTec LOCO AD metric, image AUROC, MVTec AD PRO, one evaluator per
evaluation level, maps I/O and reports."""

from engine.metrics.auroc import auroc, auroc_official, roc_curve, roc_points_official
from engine.metrics.curve import trapezoid
from engine.metrics.evaluators import (
    ImageMetrics,
    TestMetrics,
    make_evaluator,
    metric_cells,
    metrics_json,
)
from engine.metrics.loco import (
    MAX_FPRS,
    LocoEvaluator,
    LocoMetrics,
    RocCurve,
    SproCurve,
    compute_loco_metrics,
)
from engine.metrics.maps_io import find_map, iter_maps, map_path, read_map, write_map, write_maps
from engine.metrics.mvtec import MVTecMetrics, ProCurve, compute_mvtec_metrics
from engine.metrics.report import format_table, write_metrics_json

__all__ = [
    "MAX_FPRS",
    "ImageMetrics",
    "LocoEvaluator",
    "LocoMetrics",
    "MVTecMetrics",
    "ProCurve",
    "RocCurve",
    "SproCurve",
    "TestMetrics",
    "auroc",
    "auroc_official",
    "compute_loco_metrics",
    "compute_mvtec_metrics",
    "find_map",
    "format_table",
    "iter_maps",
    "make_evaluator",
    "map_path",
    "metric_cells",
    "metrics_json",
    "read_map",
    "roc_curve",
    "roc_points_official",
    "trapezoid",
    "write_map",
    "write_maps",
    "write_metrics_json",
]
