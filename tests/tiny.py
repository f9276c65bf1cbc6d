"""Tiny random-weight diffusers models, conditionings and schedules shared by the cache tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

import harmonica as hc
from harmonica.sampling import denoise, guided

STEPS = 6
BLOCKS = 3
TEXT_TOKENS = 5
CAPTION_DIM = 24


def make_dit(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    # num_embeds_ada_norm=1000: DiTPipeline hard-codes the null class 1000 for CFG.
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=BLOCKS, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )
    return model.eval().requires_grad_(False)


def make_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=BLOCKS,
        cross_attention_dim=32, caption_channels=CAPTION_DIM, sample_size=8, patch_size=2,
    )
    return model.eval().requires_grad_(False)


def make_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=8,
    ).eval()


def dit_conditioning(batch: int = 2):
    labels = torch.arange(batch) % 7
    return {"class_labels": labels}, {"class_labels": torch.full_like(labels, 1000)}


def pixart_conditioning(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(batch, TEXT_TOKENS, CAPTION_DIM, generator=g)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
    mask[:, -1] = 0  # a padded text token: the mask must reach cross-attention
    extra = {"resolution": None, "aspect_ratio": None}
    cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "added_cond_kwargs": extra}
    uncond = {"encoder_hidden_states": torch.zeros_like(embeds), "encoder_attention_mask": mask, "added_cond_kwargs": extra}
    return cond, uncond


MODELS = {"dit": (make_dit, dit_conditioning), "pixart": (make_pixart, pixart_conditioning)}


def random_schedule(seed: int = 0, steps: int = STEPS, blocks: int = BLOCKS) -> hc.Schedule:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(steps, blocks, 2, generator=g) < 0.5
    mask[0] = True
    return hc.Schedule(mask)


SCHEDULES = {
    "fora2": lambda: hc.Schedule.fora(STEPS, BLOCKS, interval=2),
    "fora3": lambda: hc.Schedule.fora(STEPS, BLOCKS, interval=3),
    "random": random_schedule,
    "delta_dit": lambda: hc.Schedule.delta_dit(STEPS, BLOCKS, num_cached_blocks=2),
}


def pixart_pipeline(cls=PixArtAlphaPipeline):
    return cls(
        tokenizer=None, text_encoder=None, vae=make_vae(), transformer=make_pixart(),
        scheduler=DPMSolverMultistepScheduler(),
    )


def pixart_pipeline_kwargs():
    cond, uncond = pixart_conditioning(1)
    return dict(
        prompt_embeds=cond["encoder_hidden_states"], prompt_attention_mask=cond["encoder_attention_mask"],
        negative_prompt=None, negative_prompt_embeds=uncond["encoder_hidden_states"],
        negative_prompt_attention_mask=uncond["encoder_attention_mask"], num_inference_steps=STEPS,
        guidance_scale=4.5, height=8, width=8, use_resolution_binning=False, output_type="np",
    )


def dit_pipeline() -> DiTPipeline:
    return DiTPipeline(transformer=make_dit(), vae=make_vae(), scheduler=DDIMScheduler())


def dit_pipeline_kwargs() -> dict:
    return dict(class_labels=[1, 5], num_inference_steps=STEPS, guidance_scale=4.0, output_type="np")


class HookedReference:
    """The caching rule, implemented straightforwardly on the unpatched model with forward hooks.

    It runs the *unpatched* diffusers model and, through forward hooks on each block's ``attn1`` and
    ``ff``, replaces a skipped branch's output by the one from the last step that computed it (the
    pre-gate branch output, which is exactly what those modules return). It shares no code with
    harmonica's cached block forwards; ``step`` is set by the caller.
    """

    def __init__(self, model, mask: torch.Tensor):
        self.mask, self.step, self.saved, self.handles = mask, 0, {}, []
        for l, block in enumerate(model.transformer_blocks):
            for b, module in enumerate((block.attn1, block.ff)):
                self.handles.append(module.register_forward_hook(self._hook(l, b)))

    def _hook(self, l, b):
        def hook(module, args, output):
            if bool(self.mask[self.step, l, b]):
                self.saved[(l, b)] = output
                return None
            return self.saved[(l, b)]

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def reference_sample(model, schedule, latents, cond, uncond, guidance, steps=STEPS, scheduler=None):
    ref = HookedReference(model, schedule.mask)
    inner = guided(model, cond, uncond, guidance)

    def model_fn(x, t, step):
        ref.step = step
        return inner(x, t, step)

    try:
        with torch.no_grad():
            return denoise(model_fn, scheduler or DDIMScheduler(), latents, num_inference_steps=steps, progress=False)
    finally:
        ref.remove()


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())




def hooked_pipeline_run(pipe, kwargs_fn, schedule):
    """A pipeline's output under ``schedule`` computed by HookedReference, its step advanced by the
    pipeline's own scheduler."""
    ref = HookedReference(pipe.transformer, schedule.mask)
    inner_step = pipe.scheduler.step

    def counting_step(*args, **kwargs):
        out = inner_step(*args, **kwargs)
        ref.step += 1
        return out

    pipe.scheduler.step = counting_step
    try:
        return pipe(**kwargs_fn(), generator=torch.Generator().manual_seed(0)).images
    finally:
        ref.remove()
        del pipe.scheduler.step
