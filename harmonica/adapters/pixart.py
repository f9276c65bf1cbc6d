"""PixArt-alpha / PixArt-sigma: BasicTransformerBlock with ``norm_type="ada_norm_single"``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..schedule import ModelCost
from . import BlockArgs, ModelFacts, attention_flops, block_width, linear_flops, rows, transformer_cost

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

    def block_forward(self, block, index: int, runner, hidden_states: torch.Tensor, args: BlockArgs) -> torch.Tensor:
        batch = hidden_states.shape[0]
        # The timestep here is the adaLN-single embedding (B, 6 * D): per sample, cheap, recomputed every step.
        modulation = block.scale_shift_table[None] + args.timestep.reshape(batch, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        attn_kwargs = args.cross_attention_kwargs or {}

        def attn(x: torch.Tensor, index_rows: torch.Tensor | None) -> torch.Tensor:
            h = block.norm1(x) * (1 + rows(scale_msa, index_rows)) + rows(shift_msa, index_rows)
            return block.attn1(h, attention_mask=rows(args.attention_mask, index_rows), **attn_kwargs)

        def mlp(x: torch.Tensor, index_rows: torch.Tensor | None) -> torch.Tensor:
            h = block.norm2(x) * (1 + rows(scale_mlp, index_rows)) + rows(shift_mlp, index_rows)
            return block.ff(h)

        hidden_states = runner.run_branch(index, 0, hidden_states, gate_msa, attn)
        if block.attn2 is not None:
            # Cross-attention to the prompt is ungated and never cached: it is what ties the image to the text.
            hidden_states = (
                block.attn2(
                    hidden_states,
                    encoder_hidden_states=args.encoder_hidden_states,
                    attention_mask=args.encoder_attention_mask,
                    **attn_kwargs,
                )
                + hidden_states
            )
        return runner.run_branch(index, 1, hidden_states, gate_mlp, mlp)

    def model_cost(self, transformer: nn.Module, batch: int, height: int, width: int,
                   text_tokens: Optional[int] = None) -> ModelCost:
        text_tokens = DEFAULT_TEXT_TOKENS if text_tokens is None else text_tokens

        def block_fixed(block, tokens, dim):  # cross-attention and the three residual adds
            cross = attention_flops(block.attn2, tokens, text_tokens) if block.attn2 is not None else 0.0
            return cross + 3 * 2.0 * tokens * dim

        def model_fixed(tokens):
            caption = linear_flops(transformer.caption_projection, text_tokens) if transformer.caption_projection else 0.0
            return linear_flops(transformer.adaln_single, 1) + caption + linear_flops(transformer.proj_out, tokens)

        return transformer_cost(transformer, batch, height, width, block_fixed, model_fixed)
