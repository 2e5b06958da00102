"""Networks with weights: the SDXL UNet (openaimodel layout), the KL autoencoder, attention backends, UNet patches.

The names below are loaded on first use (:mod:`sgm._lazy`): importing this package, or a
torch-free module of it such as ``sgm.networks.sizes``, imports no torch.
"""

from .._lazy import lazy_namespace

_MODULES = {
    ".attention": ["CrossAttention", "attention_backend", "get_attention_backend", "set_attention_backend",
                   "xformers_available"],
    ".autoencoder": ["AutoencoderKL", "IdentityFirstStage"],
    ".distributions": ["DiagonalGaussianDistribution"],
    ".freeu": ["FreeU"],
    ".openaimodel": ["UNetModel"],
    ".patches": ["UNetPatch", "apply_patches"],
    ".transformer": ["BasicTransformerBlock", "SpatialTransformer"],
    ".vae": ["Decoder", "Encoder"],
}
__getattr__, __dir__, __all__ = lazy_namespace(__name__, _MODULES)
