"""A tiny vision transformer for small images (8x8 digits): timm's ``VisionTransformer`` with
2x2 patches, so PEFT techniques see the module names of every timm ViT (``blocks.N.attn.qkv``,
``blocks.N.attn.proj``, ``blocks.N.mlp.fc1`` / ``fc2``, ``patch_embed.proj``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from reglab.models.registry import register_backbone


@register_backbone("vit")
def tiny_vit(input_shape: Sequence[int], patch_size: int = 2, embed_dim: int = 64, depth: int = 4,
             num_heads: int = 4, mlp_ratio: float = 2.0) -> nn.Module:
    """(channels, height, width) images -> the class token's ``embed_dim`` features."""
    from timm.models.vision_transformer import VisionTransformer

    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise ValueError(f"the vit backbone needs square (channels, size, size) inputs, got {tuple(input_shape)}")
    model = VisionTransformer(img_size=input_shape[1], patch_size=patch_size, in_chans=input_shape[0], num_classes=0,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    model.feature_dim = embed_dim
    return model
