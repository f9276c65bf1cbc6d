"""TrainConfig and the conditioning sources router training draws from.

Everything a run needs is checked by :func:`validate` before the first forward pass, so a typo or an
impossible target fails in milliseconds with the field name and the fix, not after an hour of training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import torch

from .. import formats
from ..adapters import ModelFacts
from ..schedule import DEFAULT_THRESHOLD, MAX_ORDER, ModelCost, Router, Schedule

__all__ = ["ClassConditioning", "PromptConditioning", "TrainConfig", "METHODS", "IEPO_VARIANTS", "start_from"]

METHODS = ("harmonica", "l2c")
IEPO_VARIANTS = ("paper", "sensitivity", "cumulative")
# The reference code's learning rates (AdamW): HarmoniCa 0.01, L2C 1e-3.
DEFAULT_LR = {"harmonica": 1e-2, "l2c": 1e-3}


@dataclasses.dataclass
class ClassConditioning:
    """Class-conditional DiT: each sample gets a uniformly random label; CFG's other half the null id."""

    num_classes: int
    null_class: int

    @property
    def num_choices(self) -> int:
        return self.num_classes

    def kwargs(self, choices: torch.Tensor, device) -> tuple[dict, dict]:
        labels = choices.to(device)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.null_class)}

    def text_tokens(self) -> Optional[int]:
        return None

    def describe(self) -> dict:
        return {"kind": "class", "num_classes": self.num_classes, "null_class": self.null_class}

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        for name in ("num_classes", "null_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ClassConditioning.{name} must be an int >= 0, got {value!r}")
        if self.num_classes < 1:
            raise ValueError("ClassConditioning.num_classes must be >= 1, got 0")


@dataclasses.dataclass
class PromptConditioning:
    """A text-conditioned model (PixArt) trained on a fixed set of precomputed prompt embeddings.

    embeds (N, S, D) and mask (N, S) are the text encoder's outputs for N training prompts; each sample
    draws one prompt uniformly. negative_embeds/negative_mask, shape (S, D)/(S,), are the encoding of
    the negative (usually empty) prompt, required when guidance_scale != 1: unlike DiT's null label
    there is no correct default, an all-zero embedding is not what PixArt was trained with.
    added_cond_kwargs is passed through (PixArt-alpha: resolution/aspect_ratio, or None values).
    """

    embeds: torch.Tensor
    mask: Optional[torch.Tensor] = None
    negative_embeds: Optional[torch.Tensor] = None
    negative_mask: Optional[torch.Tensor] = None
    added_cond_kwargs: Optional[dict] = None

    @property
    def num_choices(self) -> int:
        return self.embeds.shape[0]

    def kwargs(self, choices: torch.Tensor, device) -> tuple[dict, dict]:
        index = choices.to(self.embeds.device)
        extra = dict(self.added_cond_kwargs or {"resolution": None, "aspect_ratio": None})
        embeds = self.embeds.index_select(0, index).to(device)
        mask = None if self.mask is None else self.mask.index_select(0, index).to(device)
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "added_cond_kwargs": extra}
        if self.negative_embeds is None:
            return cond, None
        n = index.shape[0]
        neg = self.negative_embeds.to(device).expand(n, *self.negative_embeds.shape)
        neg_mask = None
        if self.negative_mask is not None:
            neg_mask = self.negative_mask.to(device).expand(n, *self.negative_mask.shape)
        elif mask is not None:
            neg_mask = torch.ones_like(mask)
        uncond = {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask, "added_cond_kwargs": extra}
        return cond, uncond

    def text_tokens(self) -> Optional[int]:
        return self.embeds.shape[1]

    def describe(self) -> dict:
        return {"kind": "prompts", "num_prompts": int(self.embeds.shape[0]), "tokens": int(self.embeds.shape[1]),
                "dim": int(self.embeds.shape[2])}

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.dim() != 3 or self.embeds.shape[0] < 1:
            raise ValueError(
                f"PromptConditioning.embeds must be a (num_prompts, tokens, dim) tensor of text-encoder "
                f"outputs, got {getattr(self.embeds, 'shape', type(self.embeds).__name__)}"
            )
        n, s, d = self.embeds.shape
        if self.mask is not None and tuple(self.mask.shape) != (n, s):
            raise ValueError(f"PromptConditioning.mask must have shape {(n, s)}, got {tuple(self.mask.shape)}")
        if self.negative_embeds is not None and tuple(self.negative_embeds.shape) != (s, d):
            raise ValueError(
                f"PromptConditioning.negative_embeds must have shape {(s, d)} (one encoded negative prompt), "
                f"got {tuple(self.negative_embeds.shape)}"
            )
        if self.negative_mask is not None and tuple(self.negative_mask.shape) != (s,):
            raise ValueError(f"PromptConditioning.negative_mask must have shape {(s,)}, got {tuple(self.negative_mask.shape)}")
        # A NaN here makes every student and teacher output NaN; training would then end with NaN
        # router logits and be reported as a diverged router instead of bad inputs.
        for name in ("embeds", "negative_embeds"):
            value = getattr(self, name)
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"PromptConditioning.{name} contains NaN or infinite values; check the text "
                                 f"encoder's outputs (e.g. a float16 overflow) before training")


Conditioning = Union[ClassConditioning, PromptConditioning]


@dataclasses.dataclass
class TrainConfig:
    """Router training settings. See :func:`harmonica.train.train_router`.

    method:        "harmonica" (SDT + IEPO, image-free) or "l2c" (the Learning-to-Cache baseline,
                   needs clean latents ``l2c_latents``; DDIM only).
    num_steps:     model evaluations per sampling run (the router's T).
    conditioning:  ClassConditioning (DiT) or PromptConditioning (PixArt).
    batch_size:    samples per process per iteration (CFG doubles the model batch).
    iterations:    HarmoniCa: trajectories (each = num_steps - 1 optimiser updates);
                   L2C: optimiser updates.
    lr:            AdamW learning rate; None = the reference value (0.01 HarmoniCa, 1e-3 L2C).
    beta:          regulariser weight on sum(w_t); with a target it is only the starting value.
    target_speedup / target_cur: optional; beta is then adapted during training (a Lagrange
                   multiplier on the router's soft CUR/speedup, see trainer.soft_measure) and the final
                   threshold chosen so the delivered (hard) schedule meets the target.
    beta_adapt_rate: log-space step of beta per optimiser update per unit of target error.
    iepo_refresh:  C, iterations between IEPO lambda refreshes (HarmoniCa only).
    forecast_order: how the delivered schedule serves a skipped unit, and so what training blends
                   with: 0 = reuse of its last output (HarmoniCa, L2C), m = a forecast of order m from its
                   last m + 1 computes (harmonica.cache.forecast; 1 or 2 recommended).
    iepo_variant:  "paper" (lambda_t from disabling caching at step t only), "sensitivity" (from
                   computing vs caching all of step t, whatever the router decides there) or
                   "cumulative" (the reference code's variant); see harmonica.train.iepo.
    threshold:     the inference threshold tau used to measure CUR during training (and the final
                   threshold when no target is given or ``keep_threshold`` is set).
    keep_threshold: never deliver a threshold above ``threshold``, the one training followed (a unit
                   refreshes its cache where its weight exceeds it), so every unit training computed
                   computes at inference: the final threshold is the one that meets the target if that is
                   lower (more computes), else ``threshold``; beta steers the speedup of the hard schedule
                   at ``threshold``. Use it for forecasting: a forecast's error grows with the gap since
                   the unit's last compute, and a higher threshold after training makes gaps training
                   never saw (RESULTS.md). Pair it with a threshold near 0.5 and an ``init_router`` such
                   as ``Router.from_schedule(Schedule.taylorseer(T, L, 3, order=2))``.
    init_router:   the router training starts from (default: logits ~ N(0, init_std^2)).
    history_grad:  SDT only: a step's loss also reaches the weights of the earlier refreshes its
                   forecast extrapolates from (a compute's credit for later forecasts; without it the
                   cached history is detached and dropping a history-building compute looks free).
    l2c_latents:   (N, C, H, W) clean model-space inputs for L2C; l2c_choices (N,) their labels /
                   prompt indices (None = random conditioning).
    checkpoint_every: iterations between checkpoints (0 = only the final one) in checkpoint_dir.
    log_file:      one JSON line per iteration. A new run starts the file afresh; a resumed run keeps
                   the lines up to its checkpoint's iteration and continues after them.

    The fields are checked at construction (:func:`check_fields`); what depends on the model, the
    sampler and the file system (output locations) is checked by ``train_router`` before any work.
    """

    method: str = "harmonica"
    num_steps: int = 20
    conditioning: Optional[Conditioning] = None
    guidance_scale: float = 1.5
    batch_size: int = 8
    iterations: int = 100
    lr: Optional[float] = None
    weight_decay: float = 0.0
    beta: float = 1e-4
    target_speedup: Optional[float] = None
    target_cur: Optional[float] = None
    beta_adapt_rate: float = 0.02
    iepo_refresh: int = 500
    forecast_order: int = 0
    iepo_variant: str = "paper"
    threshold: float = DEFAULT_THRESHOLD
    keep_threshold: bool = False
    history_grad: bool = False
    clamp: float = 5.0
    init_std: float = 1.0
    init_router: Optional[Router] = None
    l2c_latents: Optional[torch.Tensor] = None
    l2c_choices: Optional[torch.Tensor] = None
    latent_size: Optional[int] = None
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    log_file: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        check_fields(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def to_json(self) -> dict:
        """The settings that define the result (recorded in router metadata and checkpoints)."""
        skip = {"conditioning", "init_router", "l2c_latents", "l2c_choices", "checkpoint_dir", "resume",
                "log_file", "progress"}
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        doc["lr"] = self.learning_rate
        doc["conditioning"] = self.conditioning.describe() if self.conditioning is not None else None
        # What the run started from: a schedule's metadata (Router.from_schedule), or just that there was one.
        doc["init_router"] = self.init_router is not None and (self.init_router.metadata.get("init_schedule") or True)
        if self.l2c_latents is not None:
            doc["l2c_latents"] = list(self.l2c_latents.shape)
        return doc


def start_from(schedule: Schedule, *, threshold: float = 0.5) -> dict:
    """TrainConfig settings for a router that starts as ``schedule`` and learns where to move its computes:

        start = Schedule.taylorseer(T, L, interval=3, order=2)
        TrainConfig(**start_from(start), target_speedup=start.theoretical_speedup(cost), ...)

    The router starts with logits +-3 (:meth:`Router.from_schedule`), serves skipped units as the
    schedule does, is delivered at no higher threshold than training followed (``keep_threshold``),
    IEPO weights each step whichever way the router decides it ("sensitivity"), and a compute is
    credited with the later forecasts it feeds (``history_grad``)."""
    router = Router.from_schedule(schedule)
    return {"init_router": router, "forecast_order": router.forecast_order, "keep_threshold": True,
            "threshold": threshold, "iepo_variant": "sensitivity", "history_grad": True}


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"TrainConfig.{field}: {problem}")


def _positive_int(config: TrainConfig, name: str, allow_zero: bool = False) -> None:
    value = getattr(config, name)
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(name, f"must be an int >= {low}, got {value!r}")


def _number(config: TrainConfig, name: str, *, low: float, strict: bool, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        raise _fail(name, f"must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def max_reachable(num_steps: int, num_blocks: int, cost: ModelCost) -> tuple[float, float]:
    """(CUR, theoretical speedup) of caching every unit of steps 1..T-1: no router can exceed them."""
    mask = torch.zeros(num_steps, num_blocks, 2, dtype=torch.bool)
    mask[0] = True
    everything = Schedule(mask)
    return everything.cache_usage, everything.theoretical_speedup(cost)


def check_fields(config: TrainConfig) -> None:
    """Raise ValueError naming the first bad field and the fix, from the fields alone (no model, no
    files). Run at construction, and again by :func:`validate` since fields can be reassigned."""
    if config.method not in METHODS:
        raise _fail("method", f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    for name in ("num_steps", "batch_size", "iterations", "iepo_refresh"):
        _positive_int(config, name)
    if config.num_steps < 2:
        raise _fail("num_steps", f"must be >= 2 (step 0 always computes, so 1 step leaves nothing to learn), "
                                 f"got {config.num_steps}")
    _positive_int(config, "checkpoint_every", allow_zero=True)
    if config.latent_size is not None:
        _positive_int(config, "latent_size")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise _fail("seed", f"must be an int >= 0, got {config.seed!r}")
    _number(config, "guidance_scale", low=0.0, strict=False)
    _number(config, "lr", low=0.0, strict=True, optional=True)
    _number(config, "weight_decay", low=0.0, strict=False)
    _number(config, "beta", low=0.0, strict=True)
    _number(config, "beta_adapt_rate", low=0.0, strict=False)
    _number(config, "clamp", low=0.0, strict=True)
    _number(config, "init_std", low=0.0, strict=False)
    _number(config, "target_cur", low=0.0, strict=True, optional=True)
    _number(config, "target_speedup", low=1.0, strict=True, optional=True)
    if config.target_speedup is not None and config.target_cur is not None:
        raise _fail("target_speedup", "pass at most one of target_speedup and target_cur")
    threshold = config.threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise _fail("threshold", f"must be in (0, 1) (compute iff weight > threshold), got {threshold!r}")
    for name in ("keep_threshold", "history_grad"):
        if not isinstance(getattr(config, name), bool):
            raise _fail(name, f"must be True or False, got {getattr(config, name)!r}")
    if config.iepo_variant not in IEPO_VARIANTS:
        raise _fail("iepo_variant", f"unknown variant {config.iepo_variant!r}; choose one of "
                                    f"{', '.join(IEPO_VARIANTS)}")
    order = config.forecast_order
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise _fail("forecast_order", f"must be an int in [0, {MAX_ORDER}] (0 = reuse), got {order!r}")

    cond = config.conditioning
    if cond is not None:
        if not isinstance(cond, (ClassConditioning, PromptConditioning)):
            raise _fail("conditioning", f"must be ClassConditioning(num_classes, null_class) for DiT or "
                                        f"PromptConditioning(embeds, ...) for PixArt, got {type(cond).__name__}")
        cond.check()
    if config.init_router is not None and not isinstance(config.init_router, Router):
        raise _fail("init_router", f"must be a harmonica Router, got {type(config.init_router).__name__}")
    if config.method == "l2c":
        x = config.l2c_latents
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] < 1:
            raise _fail("l2c_latents", "L2C trains on real data: pass clean model-space inputs (N, C, H, W) "
                                       "(for the testbed: harmonica.testbed.data.load_tensors('train')[0])")
        if not bool(torch.isfinite(x).all()):
            raise _fail("l2c_latents", "contains NaN or infinite values; pass clean, finite model-space inputs")
        c = config.l2c_choices
        if c is not None:
            if not isinstance(c, torch.Tensor) or tuple(c.shape) != (x.shape[0],) or c.dtype != torch.long:
                raise _fail("l2c_choices", f"must be an int64 tensor of shape ({x.shape[0]},) (labels / prompt "
                                           f"indices of l2c_latents), got {getattr(c, 'shape', c)!r}")
            if cond is not None and (int(c.min()) < 0 or int(c.max()) >= cond.num_choices):
                raise _fail("l2c_choices", f"values must lie in [0, {cond.num_choices}), got {int(c.min())}.."
                                           f"{int(c.max())}")
    if config.resume and not config.checkpoint_dir:
        raise _fail("resume", "resume=True needs checkpoint_dir (where the interrupted run wrote its checkpoints)")


def validate(config: TrainConfig, *, sampler: str, facts: ModelFacts, cost_fn: Callable[[], ModelCost]) -> ModelCost:
    """Raise ValueError naming the first bad field and the fix; does no model work.

    Checks the fields (:func:`check_fields`), then everything that depends on the model (``facts``)
    and the sampler, then that the output locations can be written. Returns the model's cost from
    ``cost_fn`` (called once the fields it depends on are known good)."""
    from ..sampling import SCHEDULERS

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a harmonica TrainConfig, got {type(config).__name__}")
    check_fields(config)
    if sampler not in SCHEDULERS:
        raise ValueError(
            f"scheduler {sampler} is not supported for router training; use one of {', '.join(SCHEDULERS)} "
            f"(harmonica.sampling.make_scheduler(name, config))"
        )
    if config.method == "l2c" and sampler != "ddim":
        raise ValueError(
            f"L2C training supports the DDIM scheduler only (its one-step cache fill needs a stateless "
            f"sampler step), got {sampler}; pass a DDIMScheduler or use method='harmonica'"
        )

    cond = config.conditioning
    if cond is None:
        raise _fail("conditioning", "is required: ClassConditioning(num_classes, null_class) for DiT or "
                                    "PromptConditioning(embeds, ...) for PixArt")
    model_class, num_blocks = facts.model_class, facts.num_blocks
    if facts.conditioning == "text" and not isinstance(cond, PromptConditioning):
        raise _fail("conditioning", f"{model_class} is text-conditioned; pass PromptConditioning(embeds, mask, ...)")
    if facts.conditioning == "class" and not isinstance(cond, ClassConditioning):
        raise _fail("conditioning", f"{model_class} is class-conditioned; pass ClassConditioning(num_classes, null_class)")
    if isinstance(cond, ClassConditioning):
        if cond.num_classes > facts.num_classes:
            raise _fail("conditioning", f"ClassConditioning.num_classes={cond.num_classes} but {model_class} has "
                                        f"{facts.num_classes} classes; pass num_classes <= {facts.num_classes}")
        if config.guidance_scale != 1.0 and cond.null_class != facts.null_class:
            expected = ("this model has no unconditional label; train with guidance_scale=1" if facts.null_class is None
                        else f"the model's unconditional label is {facts.null_class}; pass null_class={facts.null_class}")
            raise _fail("conditioning", f"ClassConditioning.null_class={cond.null_class} is wrong: {expected}")
    if isinstance(cond, PromptConditioning) and facts.text_dim is not None and cond.embeds.shape[-1] != facts.text_dim:
        raise _fail("conditioning", f"PromptConditioning.embeds have width {cond.embeds.shape[-1]} but {model_class} "
                                    f"expects text-encoder outputs of width {facts.text_dim} (caption_channels)")
    if isinstance(cond, PromptConditioning) and config.guidance_scale != 1.0 and cond.negative_embeds is None:
        raise _fail("conditioning", "guidance_scale != 1 needs PromptConditioning.negative_embeds (the encoded "
                                    "negative prompt); pass it or set guidance_scale=1")

    cost = cost_fn()
    max_cur, max_speedup = max_reachable(config.num_steps, num_blocks, cost)
    if config.target_cur is not None and config.target_cur > max_cur:
        raise _fail("target_cur", f"{config.target_cur} is unreachable: caching every unit of steps "
                                  f"1..{config.num_steps - 1} gives CUR {max_cur:.4f} at T={config.num_steps}; "
                                  f"lower the target or raise num_steps")
    if config.target_speedup is not None and config.target_speedup > max_speedup:
        raise _fail("target_speedup", f"{config.target_speedup} is unreachable: caching every unit of steps "
                                      f"1..{config.num_steps - 1} gives a theoretical speedup of "
                                      f"{max_speedup:.4f} for this model (T={config.num_steps}, L={num_blocks}); "
                                      f"lower the target")

    if config.init_router is not None:
        _check_router_fits(config.init_router, "init_router", config.num_steps, facts)

    if config.method == "l2c":
        size = config.latent_size or facts.sample_size
        expected_shape = (facts.in_channels, size, size)
        if tuple(config.l2c_latents.shape[1:]) != expected_shape:
            raise _fail("l2c_latents", f"samples have shape {tuple(config.l2c_latents.shape[1:])} but {model_class} "
                                       f"takes {expected_shape} (in_channels, latent_size, latent_size); pass "
                                       f"latents of that shape")

    # Last, so a run that would fail on its outputs fails here and not after training.
    if config.checkpoint_dir:
        from .checkpoint import path_in

        formats.check_writable(path_in(config.checkpoint_dir), "TrainConfig.checkpoint_dir: the checkpoint")
    if config.log_file:
        formats.check_writable(config.log_file, "TrainConfig.log_file:")
    return cost


def _check_router_fits(router: Router, field: str, num_steps: int, facts: ModelFacts) -> None:
    try:
        router.check_compatible(num_steps=num_steps, num_blocks=facts.num_blocks, model_class=facts.model_class,
                                block_width=facts.block_width)
    except ValueError as e:
        raise _fail(field, f"{e}; use a router trained for this model and step count, or none") from None
