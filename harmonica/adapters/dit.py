"""DiT: diffusers BasicTransformerBlock with ``norm_type="ada_norm_zero"`` (DiTTransformer2DModel)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.install import hooked
from ..schedule import ModelCost
from . import BlockArgs, ModelFacts, block_width, linear_flops, rows, transformer_cost


class DiT:
    name = "dit"
    description = "DiTTransformer2DModel / Transformer2DModel with ada_norm_zero blocks, e.g. DiTPipeline"

    def matches(self, block: nn.Module) -> bool:
        return (
            getattr(block, "norm_type", None) == "ada_norm_zero"
            and getattr(block, "attn2", None) is None
            and getattr(block, "pos_embed", None) is None
        )

    def facts(self, transformer: nn.Module) -> ModelFacts:
        blocks = transformer.transformer_blocks
        labels = blocks[0].norm1.emb.class_embedder
        # diffusers' LabelEmbedding has one extra row, the unconditional embedding, when trained with label dropout.
        null = labels.num_classes if labels.embedding_table.num_embeddings > labels.num_classes else None
        return ModelFacts(
            family=self.name, model_class=type(transformer).__name__, num_blocks=len(blocks),
            block_width=block_width(blocks[0]), sample_size=transformer.config.sample_size,
            in_channels=transformer.config.in_channels, conditioning="class", num_classes=labels.num_classes,
            null_class=null,
        )

    def block_forward(self, block, index: int, runner, hidden_states: torch.Tensor, args: BlockArgs) -> torch.Tensor:
        norm1 = block.norm1
        # The adaLN modulation is per sample (no tokens) and always runs, so the gates follow the step.
        cond = norm1.silu(norm1.emb(args.timestep, args.class_labels, hidden_dtype=hidden_states.dtype))
        attn_on, mlp_on = runner.computes(index)
        if (attn_on and mlp_on) or hooked(norm1.linear):
            # A hooked linear (offloaded or cast weights) must be called as a module.
            chunks = norm1.linear(cond).chunk(6, dim=1)
        else:
            # A reused branch needs only its gate. The modulation linear (D x 6D weights) is memory-bound at
            # small batch, so reading just the needed row blocks of it is what makes a cached step cheap.
            weight, bias = norm1.linear.weight.chunk(6), norm1.linear.bias.chunk(6)
            needed = (attn_on, attn_on, True, mlp_on, mlp_on, True)
            chunks = [F.linear(cond, w, b) if need else None for w, b, need in zip(weight, bias, needed)]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
        attn_kwargs = args.cross_attention_kwargs or {}

        def attn(x: torch.Tensor, index_rows: torch.Tensor | None) -> torch.Tensor:
            h = norm1.norm(x) * (1 + rows(scale_msa, index_rows)[:, None]) + rows(shift_msa, index_rows)[:, None]
            return block.attn1(h, attention_mask=rows(args.attention_mask, index_rows), **attn_kwargs)

        def mlp(x: torch.Tensor, index_rows: torch.Tensor | None) -> torch.Tensor:
            h = block.norm3(x) * (1 + rows(scale_mlp, index_rows)[:, None]) + rows(shift_mlp, index_rows)[:, None]
            return block.ff(h)

        hidden_states = runner.run_branch(index, 0, hidden_states, gate_msa, attn)
        return runner.run_branch(index, 1, hidden_states, gate_mlp, mlp)

    def model_cost(self, transformer: nn.Module, batch: int, height: int, width: int,
                   text_tokens: Optional[int] = None) -> ModelCost:
        return transformer_cost(
            transformer, batch, height, width,
            # the modulation linear and the two gated residual adds
            block_fixed=lambda block, tokens, dim: linear_flops(block.norm1, 1) + 2 * 2.0 * tokens * dim,
            model_fixed=lambda tokens: linear_flops(transformer.proj_out_1, 1) + linear_flops(transformer.proj_out_2, tokens),
        )
