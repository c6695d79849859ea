"""Scaling arithmetic: FLOPs, laws and their fits, the compute and layout planners; importing it starts nothing.

Names load on first use.
"""

from engine._lazy import lazy_exports

_EXPORTS = {
    "ActivationEstimate": "engine.scaling.memory",
    "engine_activation_bytes": "engine.scaling.activations",
    "rank_activation_bytes": "engine.scaling.activations",
    "activation_bytes_per_layer": "engine.scaling.memory",
    "estimate_activations": "engine.scaling.memory",
    "optimizer_state_bytes": "engine.scaling.memory",
    "format_bytes": "engine.scaling.memory",
    "DEVICE_PEAK_FLOPS": "engine.scaling.flops",
    "hardware_flops_per_token": "engine.scaling.flops",
    "hardware_flops_utilization": "engine.scaling.flops",
    "peak_flops_of": "engine.scaling.flops",
    "training_flops": "engine.scaling.flops",
    "PF_DAY": "engine.scaling.laws",
    "KaplanLaw": "engine.scaling.laws",
    "AllocationLaw": "engine.scaling.laws",
    "ParametricLaw": "engine.scaling.laws",
    "KAPLAN": "engine.scaling.laws",
    "CHINCHILLA_APPROACH1": "engine.scaling.laws",
    "CHINCHILLA_APPROACH2": "engine.scaling.laws",
    "CHINCHILLA_APPROACH3": "engine.scaling.laws",
    "BESIROGLU": "engine.scaling.laws",
    "LAWS": "engine.scaling.laws",
    "CHINCHILLA_EXPONENTS": "engine.scaling.laws",
    "pearce_song_total_params": "engine.scaling.laws",
    "optimal_non_embedding": "engine.scaling.laws",
    "PlanRow": "engine.scaling.planner",
    "PlanError": "engine.scaling.planner",
    "plan": "engine.scaling.planner",
    "plan_config": "engine.scaling.planner",
    "budget_flops": "engine.scaling.planner",
    "model_config_near": "engine.scaling.planner",
    "Layout": "engine.scaling.layout",
    "estimate_layout": "engine.scaling.layout",
    "plan_layouts": "engine.scaling.layout",
    "rank_params": "engine.scaling.layout",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
