"""Hardware-aware performance model: roofline step costs, hardware specs, calibration, planning."""

from .hardware import REGISTRY, HardwareSpec, HardwareSpecError, available_specs, load_spec, save_spec
from .ops import SeqWork, StepShape, StepStats, operator_table
from .predictor import OpTime, PerfModel, StepPrediction

__all__ = ["REGISTRY", "HardwareSpec", "HardwareSpecError", "available_specs", "load_spec", "save_spec",
           "SeqWork", "StepShape", "StepStats", "operator_table", "OpTime", "PerfModel", "StepPrediction"]
