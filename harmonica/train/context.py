"""What every training step needs in one place: the frozen model under a soft cache, the router, the
optimiser, the current beta and lambda, and the seeded draws of an iteration's inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cache import CacheRuntime
from ..schedule import Router
from .config import TrainConfig
from .distributed import World, all_reduce_mean_, draw_int, draw_normal, global_indices, seeded
from .policies import SoftPolicy, TeacherPolicy


@dataclass
class Run:
    transformer: torch.nn.Module
    scheduler: object
    runtime: CacheRuntime
    router: Router
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    world: World
    latent_shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype
    beta: float
    lam: torch.Tensor  # (T,) IEPO weights; all ones for L2C and before the first refresh
    updates: int = 0
    lambda_refreshes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    def indices(self) -> range:
        return global_indices(self.config.batch_size, self.world)

    def draw_start(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T ~ N(0, I) and conditioning choices of this process's samples at ``iteration``."""
        idx = self.indices()
        x_T = draw_normal(self.config.seed, iteration, idx, self.latent_shape, "x_T")
        choices = draw_int(self.config.seed, iteration, idx, self.config.conditioning.num_choices, "choice")
        return x_T.to(self.device, self.dtype), choices

    def sampler_generator(self, iteration: int) -> torch.Generator:
        # Only stochastic samplers (DDPM) use it; per process, since their noise is drawn per batch.
        return seeded(self.config.seed, iteration, self.world.rank, "sampler")

    def conditioning(self, choices: torch.Tensor):
        cond, uncond = self.config.conditioning.kwargs(choices, self.device)
        return cond, uncond

    def soft(self, first_step: int = 0) -> SoftPolicy:
        """The student policy at the router's current weights (no graph: the trajectory's own steps set
        graph-carrying weights before each update)."""
        return SoftPolicy(self.router.weights().detach(), self.config.threshold, first_step, self.config.forecast_order,
                          history_grad=self.config.history_grad)

    def teacher(self, fn, x: torch.Tensor, t, step: int) -> torch.Tensor:
        """Full compute, no slot read or write, no graph: the uncached model's batched output."""
        with self.runtime.using(TeacherPolicy(), keep_slots=True), torch.no_grad():
            return fn(x, t, step)[1]

    def student_update(self, fn, soft: SoftPolicy, x: torch.Tensor, t, step: int, teacher: torch.Tensor,
                       weight: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser update on the router from the soft forward at ``step``.

        loss = weight * MSE(teacher, student) + beta * sum(w_step). Only the router's logits receive
        gradient: the DiT is frozen and the teacher ran without a graph. Returns the student's guided
        eps (detached, to advance the trajectory) and the MSE (detached, for logging).
        """
        w = self.router.weights()
        soft.weights = w
        eps, student = fn(x, t, step)
        mse = F.mse_loss(student.float(), teacher.float())
        loss = weight * mse + self.beta * w[step].sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(retain_graph=self.config.history_grad)  # later steps' losses reach this step's refreshes
        all_reduce_mean_(self.router.logits.grad, self.world)
        self.optimizer.step()
        self.router.clamp_(self.config.clamp)
        self.updates += 1
        return eps.detach(), mse.detach()
