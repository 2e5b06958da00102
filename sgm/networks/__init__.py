"""Networks with weights: the SDXL UNet (openaimodel layout), the KL autoencoder, attention backends, UNet patches."""

from .attention import (
    CrossAttention,
    attention_backend,
    get_attention_backend,
    set_attention_backend,
    xformers_available,
)
from .autoencoder import AutoencoderKL, IdentityFirstStage
from .distributions import DiagonalGaussianDistribution
from .freeu import FreeU
from .openaimodel import UNetModel
from .patches import UNetPatch, apply_patches
from .transformer import BasicTransformerBlock, SpatialTransformer
from .vae import Decoder, Encoder

__all__ = [name for name in dir() if not name.startswith("_")]
