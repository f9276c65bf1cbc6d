"""harmonica: learned feature caching for Diffusion Transformers (HarmoniCa).

    import harmonica as hc
    schedule = hc.Schedule.fora(20, 28, interval=2)        # or router.to_schedule()
    hc.enable_cache(pipe, schedule)                         # drop-in, reversible
    images = pipe(..., num_inference_steps=20)
    hc.disable_cache(pipe)
"""

from . import ops, sampling
from .apply import disable_cache, enable_cache, get_cache_state, model_cost, per_sample
from .schedule import BRANCHES, ModelCost, Router, Schedule
from .train import ClassConditioning, PromptConditioning, TrainConfig, train_router

__version__ = "0.1.0"

__all__ = [
    "BRANCHES",
    "ClassConditioning",
    "PromptConditioning",
    "TrainConfig",
    "train_router",
    "ModelCost",
    "Router",
    "Schedule",
    "disable_cache",
    "enable_cache",
    "get_cache_state",
    "model_cost",
    "ops",
    "per_sample",
    "sampling",
]
