"""Model-family adapters: how to find a transformer's blocks and run one cached block forward.

An adapter is one small module with:

* ``NAME`` and ``DESCRIPTION`` (for error messages listing what is supported);
* ``matches(block) -> bool``: whether it can run this block;
* ``block_forward(block, index, state, hidden_states, **block_kwargs)``: the block's forward with each
  cacheable branch handed to ``state.run_branch`` (same keyword signature as diffusers'
  ``BasicTransformerBlock.forward``);
* ``model_cost(transformer, batch, height, width, text_tokens) -> ModelCost``: FLOPs from the real shapes.

Adding SD3 / Sana / HunyuanDiT means adding one such module to ``ADAPTERS``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from . import dit, pixart

ADAPTERS: tuple[ModuleType, ...] = (dit, pixart)


def supported_models() -> str:
    return "; ".join(f"{a.NAME} ({a.DESCRIPTION})" for a in ADAPTERS)


def find_blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            f"{type(transformer).__name__} has no `transformer_blocks`; harmonica supports: {supported_models()}"
        )
    return list(blocks)


def find_adapter(transformer: nn.Module) -> ModuleType:
    """The adapter that can run every block of ``transformer``, or a TypeError saying what is supported."""
    blocks = find_blocks(transformer)
    for adapter in ADAPTERS:
        if all(adapter.matches(block) for block in blocks):
            return adapter
    kinds = sorted({f"{type(b).__name__}(norm_type={getattr(b, 'norm_type', '?')!r})" for b in blocks})
    raise TypeError(
        f"{type(transformer).__name__} with blocks {', '.join(kinds)} is not supported; "
        f"harmonica supports: {supported_models()}"
    )


def rows(t: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    """The samples ``index`` of a per-sample tensor (all of it when index is None)."""
    return t if t is None or index is None else t.index_select(0, index)


def linear_flops(module: nn.Module, rows: int) -> float:
    """Multiply-add FLOPs of every nn.Linear in ``module`` applied to ``rows`` input vectors."""
    return float(sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


def attention_flops(attn: nn.Module, query_tokens: int, key_tokens: int) -> float:
    """Projections plus the two (query x key) products of one attention layer, per sample."""
    inner = attn.to_q.out_features
    projections = (
        linear_flops(attn.to_q, query_tokens)
        + linear_flops(attn.to_k, key_tokens)
        + linear_flops(attn.to_v, key_tokens)
        + linear_flops(attn.to_out, query_tokens)
    )
    return projections + 4.0 * query_tokens * key_tokens * inner


def patch_embed_flops(transformer: nn.Module, tokens: int) -> float:
    conv = transformer.pos_embed.proj
    return 2.0 * tokens * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]


def branch_flops(block: nn.Module, tokens: int) -> tuple[float, float]:
    """Per-sample FLOPs of a block's attn and mlp branches, as a skip saves them.

    Each includes its layer norm and modulation (~8 FLOPs per element) besides the matmuls.
    """
    elementwise = 8.0 * tokens * block.attn1.to_q.in_features
    return attention_flops(block.attn1, tokens, tokens) + elementwise, linear_flops(block.ff, tokens) + elementwise
