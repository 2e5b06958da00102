"""sgm: a Hydra-configured framework for SDXL-style latent diffusion."""

from pathlib import Path

__version__ = "0.1.0"

ASSETS = Path(__file__).resolve().parent / "assets"


def asset(name: str) -> str:
    """The path of a file shipped in ``sgm/assets`` (configs: ``${sgm.asset:digits.safetensors}``)."""
    return str(ASSETS / name)


def register_resolvers() -> None:
    """Register sgm's OmegaConf resolvers (``${sgm.asset:NAME}``); idempotent, done on import."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return
    if not OmegaConf.has_resolver("sgm.asset"):
        OmegaConf.register_new_resolver("sgm.asset", asset)
    if not OmegaConf.has_resolver("sgm.run_dir"):
        from .tasks.run_folder import run_dir

        OmegaConf.register_new_resolver("sgm.run_dir", run_dir, use_cache=True)


register_resolvers()
