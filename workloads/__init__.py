"""What a job is: transformer families with exact per-layer FLOPs, bytes, parameters and activations."""

from workloads.catalog import load_workload, workload_names
from workloads.config import FAMILIES, WorkloadConfig
from workloads.ops import LayerProfile, ShardShape
from workloads.transformer import layer_kinds, layer_profile, model_flops_per_sample, parameter_count

__all__ = [
    "FAMILIES",
    "LayerProfile",
    "ShardShape",
    "WorkloadConfig",
    "layer_kinds",
    "layer_profile",
    "load_workload",
    "model_flops_per_sample",
    "parameter_count",
    "workload_names",
]
