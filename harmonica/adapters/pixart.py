"""PixArt-alpha / PixArt-sigma: BasicTransformerBlock with ``norm_type="ada_norm_single"``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..schedule import ModelCost
from . import ModelFacts, attention_flops, block_width, branch_flops, linear_flops, patch_embed_flops, rows

DEFAULT_TEXT_TOKENS = 120  # PixArt-alpha's T5 prompt length


class PixArt:
    name = "pixart"
    description = "PixArtTransformer2DModel with ada_norm_single blocks, e.g. PixArtAlphaPipeline, PixArtSigmaPipeline"

    def matches(self, block: nn.Module) -> bool:
        return getattr(block, "norm_type", None) == "ada_norm_single" and getattr(block, "pos_embed", None) is None

    def facts(self, transformer: nn.Module) -> ModelFacts:
        blocks = transformer.transformer_blocks
        return ModelFacts(
            family=self.name, model_class=type(transformer).__name__, num_blocks=len(blocks),
            block_width=block_width(blocks[0]), sample_size=transformer.config.sample_size,
            in_channels=transformer.config.in_channels, conditioning="text",
            text_dim=transformer.config.caption_channels,
        )

    def block_forward(
        self,
        block,
        index: int,
        runner,
        hidden_states: torch.Tensor,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        timestep=None,
        cross_attention_kwargs=None,
        class_labels=None,
        added_cond_kwargs=None,
    ) -> torch.Tensor:
        batch = hidden_states.shape[0]
        # timestep here is the adaLN-single embedding (B, 6 * D): per sample, cheap, recomputed every step.
        modulation = block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        attn_kwargs = cross_attention_kwargs or {}

        def attn(x: torch.Tensor, index_rows: torch.Tensor | None) -> torch.Tensor:
            h = block.norm1(x) * (1 + rows(scale_msa, index_rows)) + rows(shift_msa, index_rows)
            return block.attn1(h, attention_mask=rows(attention_mask, index_rows), **attn_kwargs)

        def mlp(x: torch.Tensor, index_rows: torch.Tensor | None) -> torch.Tensor:
            h = block.norm2(x) * (1 + rows(scale_mlp, index_rows)) + rows(shift_mlp, index_rows)
            return block.ff(h)

        hidden_states = runner.run_branch(index, 0, hidden_states, gate_msa, attn)
        if block.attn2 is not None:
            # Cross-attention to the prompt is ungated and never cached: it is what ties the image to the text.
            hidden_states = (
                block.attn2(
                    hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    attention_mask=encoder_attention_mask,
                    **attn_kwargs,
                )
                + hidden_states
            )
        return runner.run_branch(index, 1, hidden_states, gate_mlp, mlp)

    def model_cost(self, transformer: nn.Module, batch: int, height: int, width: int,
                   text_tokens: Optional[int] = None) -> ModelCost:
        text_tokens = DEFAULT_TEXT_TOKENS if text_tokens is None else text_tokens
        patch = transformer.config.patch_size
        tokens = (height // patch) * (width // patch)
        block = transformer.transformer_blocks[0]
        dim = block.norm1.normalized_shape[0]
        num_blocks = len(transformer.transformer_blocks)
        attn, mlp = branch_flops(block, tokens)
        cross = attention_flops(block.attn2, tokens, text_tokens) if block.attn2 is not None else 0.0
        per_block_fixed = cross + 3 * 2.0 * tokens * dim  # cross-attention and the three residual adds
        fixed = (
            num_blocks * per_block_fixed
            + patch_embed_flops(transformer, tokens)
            + linear_flops(transformer.adaln_single, 1)
            + (linear_flops(transformer.caption_projection, text_tokens) if transformer.caption_projection else 0.0)
            + linear_flops(transformer.proj_out, tokens)
        )
        return ModelCost(attn=batch * attn, mlp=batch * mlp, fixed=batch * fixed, unit_elements=batch * tokens * dim)
