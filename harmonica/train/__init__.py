"""Router training: HarmoniCa (step-wise denoising training + image-error proxy) and the L2C baseline.

    from harmonica.train import TrainConfig, ClassConditioning, train_router
    router = train_router(transformer, scheduler, TrainConfig(
        method="harmonica", num_steps=20, conditioning=ClassConditioning(num_classes=1000, null_class=1000),
        guidance_scale=1.5, target_speedup=1.5))
    schedule = router.to_schedule()
"""

from .config import ClassConditioning, PromptConditioning, TrainConfig, start_from
from .trainer import check_training, train_router

__all__ = ["ClassConditioning", "PromptConditioning", "TrainConfig", "check_training", "start_from", "train_router"]
