"""MEMO (SIGMOD 2025): token-wise activation swapping and recomputation, and the bi-level memory plan."""

# The memory plan pulls in PuLP; load it on first use so importing the planner stays quick.
_MEMORY_PLAN_EXPORTS = (
    "LayerMemoryPlan",
    "LayerTensors",
    "ModelMemoryPlan",
    "Placement",
    "TensorLife",
    "check_plan",
    "greedy_best_fit",
    "online_best_fit",
    "plan_layer",
    "plan_model",
    "stack_layers",
    "transformer_layer_tensors",
    "transformer_model_tensors",
)


def __getattr__(name: str):
    if name in _MEMORY_PLAN_EXPORTS:
        from simulator.search.memo import memory_plan

        return getattr(memory_plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
