"""Model-family adapters: everything harmonica knows about one family of diffusers transformers.

An adapter (the :class:`Adapter` protocol) finds nothing by itself; given a transformer whose blocks it
matches, it says what the family is (:class:`ModelFacts`: depth, width, class or text conditioning,
the null class), runs one cached block forward, and counts FLOPs. Nothing outside this package
inspects blocks or model configs. Adding SD3 / Sana / HunyuanDiT means adding one adapter to ``ADAPTERS``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from ..schedule import ModelCost

__all__ = ["ADAPTERS", "Adapter", "BlockArgs", "BranchRunner", "ModelFacts", "find_adapter", "find_blocks", "model_facts",
           "supported_models"]


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What callers may know about a supported transformer, read once by its adapter."""

    family: str  # the adapter's name: "dit" or "pixart"
    model_class: str
    num_blocks: int
    block_width: int
    sample_size: int  # default input height/width (latent pixels)
    in_channels: int
    conditioning: str  # "class" (class labels + a null class for CFG) or "text" (prompt embeddings)
    num_classes: Optional[int] = None  # class-conditioned: labels 0..num_classes-1
    null_class: Optional[int] = None  # class-conditioned: the label of the unconditional embedding
    text_dim: Optional[int] = None  # text-conditioned: width of the prompt embeddings it projects


@runtime_checkable
class BranchRunner(Protocol):
    """What a cached block forward calls (the cache runtime)."""

    def computes(self, block: int) -> tuple[bool, bool]: ...

    def run_branch(self, block: int, branch: int, x: torch.Tensor, gate: torch.Tensor, branch_fn) -> torch.Tensor: ...


@runtime_checkable
class Adapter(Protocol):
    name: str
    description: str

    def matches(self, block: nn.Module) -> bool:
        """Whether this adapter can run ``block``."""

    def facts(self, transformer: nn.Module) -> ModelFacts: ...

    def block_forward(self, block: nn.Module, index: int, runner: BranchRunner, hidden_states: torch.Tensor,
                      args: "BlockArgs") -> torch.Tensor:
        """The block's forward with each cacheable branch handed to ``runner.run_branch``."""

    def model_cost(self, transformer: nn.Module, batch: int, height: int, width: int,
                   text_tokens: Optional[int] = None) -> ModelCost: ...


def supported_models() -> str:
    return "; ".join(f"{a.name} ({a.description})" for a in ADAPTERS)


def find_blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            f"{type(transformer).__name__} has no `transformer_blocks`; harmonica supports: {supported_models()}"
        )
    return list(blocks)


def find_adapter(transformer: nn.Module) -> Adapter:
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


def model_facts(transformer: nn.Module) -> ModelFacts:
    """:class:`ModelFacts` of a supported transformer (TypeError listing what is supported otherwise)."""
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"expected a diffusers transformer nn.Module, got {type(transformer).__name__}")
    return find_adapter(transformer).facts(transformer)


# ---------------------------------------------------------------------------------------------- shared helpers


class BlockArgs(NamedTuple):
    """The arguments of diffusers' ``BasicTransformerBlock.forward`` after ``hidden_states``, in its
    positional order (gradient checkpointing passes them positionally)."""

    attention_mask: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[torch.Tensor] = None
    encoder_attention_mask: Optional[torch.Tensor] = None
    timestep: Optional[torch.Tensor] = None
    cross_attention_kwargs: Optional[dict] = None
    class_labels: Optional[torch.Tensor] = None
    added_cond_kwargs: Optional[dict] = None


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


def block_width(block: nn.Module) -> int:
    return block.attn1.to_q.in_features


def transformer_cost(transformer: nn.Module, batch: int, height: int, width: int, block_fixed, model_fixed) -> ModelCost:
    """:class:`ModelCost` of a patch-embedding transformer of identical blocks: the family adds what a
    block spends whatever caching does (``block_fixed(block, tokens, width)``) and what the model spends
    outside its blocks besides the patch embedding (``model_fixed(tokens)``)."""
    patch = transformer.config.patch_size
    tokens = (height // patch) * (width // patch)
    block = transformer.transformer_blocks[0]
    dim = block_width(block)
    attn, mlp = branch_flops(block, tokens)
    fixed = (len(transformer.transformer_blocks) * block_fixed(block, tokens, dim)
             + patch_embed_flops(transformer, tokens) + model_fixed(tokens))
    return ModelCost(attn=batch * attn, mlp=batch * mlp, fixed=batch * fixed, unit_elements=batch * tokens * dim)


# Last: the adapters import the helpers above.
from .dit import DiT  # noqa: E402
from .pixart import PixArt  # noqa: E402

ADAPTERS: tuple[Adapter, ...] = (DiT(), PixArt())
