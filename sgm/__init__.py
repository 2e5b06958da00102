"""sgm: a Hydra-configured framework for SDXL-style latent diffusion."""

__version__ = "0.1.0"
