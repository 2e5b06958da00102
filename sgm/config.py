"""Building objects from configs: Hydra ``_target_`` nodes, objects, and original sgm YAML.

Stability AI's sgm configs use ``target:`` / ``params:`` with dotted paths such as
``sgm.modules.diffusionmodules.sampling.EulerEDMSampler``. :data:`SGM_ALIASES` maps each
of those paths to the class of this package that implements it, so such a config builds
the same objects as our Hydra configs. A target under ``sgm.`` with no alias (and no
module of ours at that path) is an error that names it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_DM = "sgm.modules.diffusionmodules"
SGM_ALIASES: dict[str, str] = {
    f"{_DM}.discretizer.EDMDiscretization": "sgm.diffusion.discretization.EDMDiscretization",
    f"{_DM}.discretizer.LegacyDDPMDiscretization": "sgm.diffusion.discretization.LegacyDDPMDiscretization",
    f"{_DM}.denoiser_scaling.EDMScaling": "sgm.diffusion.scaling.EDMScaling",
    f"{_DM}.denoiser_scaling.EpsScaling": "sgm.diffusion.scaling.EpsScaling",
    f"{_DM}.denoiser_scaling.VScaling": "sgm.diffusion.scaling.VScaling",
    f"{_DM}.denoiser_scaling.VScalingWithEDMcNoise": "sgm.diffusion.scaling.VScalingWithEDMcNoise",
    f"{_DM}.denoiser.Denoiser": "sgm.diffusion.denoiser.Denoiser",
    f"{_DM}.denoiser.DiscreteDenoiser": "sgm.diffusion.denoiser.DiscreteDenoiser",
    f"{_DM}.guiders.IdentityGuider": "sgm.diffusion.guiders.IdentityGuider",
    f"{_DM}.guiders.VanillaCFG": "sgm.diffusion.guiders.VanillaCFG",
    f"{_DM}.sampling_utils.NoDynamicThresholding": "sgm.diffusion.guiders.NoDynamicThresholding",
    f"{_DM}.sampling.EulerEDMSampler": "sgm.diffusion.samplers.EulerEDMSampler",
    f"{_DM}.sampling.HeunEDMSampler": "sgm.diffusion.samplers.HeunEDMSampler",
    f"{_DM}.sampling.EulerAncestralSampler": "sgm.diffusion.samplers.EulerAncestralSampler",
    f"{_DM}.sampling.DPMPP2SAncestralSampler": "sgm.diffusion.samplers.DPMPP2SAncestralSampler",
    f"{_DM}.sampling.DPMPP2MSampler": "sgm.diffusion.samplers.DPMPP2MSampler",
    f"{_DM}.sampling.LinearMultistepSampler": "sgm.diffusion.samplers.LinearMultistepSampler",
    f"{_DM}.sigma_sampling.EDMSampling": "sgm.diffusion.sigma_sampling.EDMSampling",
    f"{_DM}.sigma_sampling.DiscreteSampling": "sgm.diffusion.sigma_sampling.DiscreteSampling",
    f"{_DM}.loss_weighting.UnitWeighting": "sgm.diffusion.loss_weighting.UnitWeighting",
    f"{_DM}.loss_weighting.EDMWeighting": "sgm.diffusion.loss_weighting.EDMWeighting",
    f"{_DM}.loss_weighting.VWeighting": "sgm.diffusion.loss_weighting.VWeighting",
    f"{_DM}.loss_weighting.EpsWeighting": "sgm.diffusion.loss_weighting.EpsWeighting",
    f"{_DM}.loss.StandardDiffusionLoss": "sgm.diffusion.loss.StandardDiffusionLoss",
    f"{_DM}.openaimodel.UNetModel": "sgm.networks.openaimodel.UNetModel",
    f"{_DM}.wrappers.OpenAIWrapper": "sgm.networks.wrapper.OpenAIWrapper",
    "sgm.models.autoencoder.AutoencoderKL": "sgm.networks.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": "sgm.networks.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.IdentityFirstStage": "sgm.networks.autoencoder.IdentityFirstStage",
    "sgm.models.diffusion.DiffusionEngine": "sgm.engine.DiffusionEngine",
    "sgm.modules.GeneralConditioner": "sgm.conditioning.GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner": "sgm.conditioning.GeneralConditioner",
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": "sgm.conditioning.FrozenCLIPEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": "sgm.conditioning.FrozenOpenCLIPEmbedder2",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": "sgm.conditioning.ConcatTimestepEmbedderND",
    "sgm.modules.encoders.modules.AbstractEmbModel": "sgm.conditioning.AbstractEmbModel",
}


def register_alias(old: str, new: str) -> None:
    """Map an original sgm dotted path to the class of ours that implements it."""
    SGM_ALIASES[old] = new


def resolve_target(path: str) -> Any:
    """Import the object at ``path``, going through :data:`SGM_ALIASES` first."""
    path = SGM_ALIASES.get(path, path)
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, ValueError):
        if path.startswith("sgm."):
            raise ValueError(
                f"target {path!r} has no equivalent in this package: it is neither an alias of "
                f"an original sgm class (see sgm.config.SGM_ALIASES) nor a class of ours. "
                f"Use one of our classes or add an alias with sgm.config.register_alias()."
            ) from None
        raise ValueError(f"target {path!r} cannot be imported") from None


def is_sgm_node(node: Any) -> bool:
    return isinstance(node, Mapping) and "target" in node and "_target_" not in node


def convert_sgm_config(node: Any) -> Any:
    """Rewrite an sgm ``target``/``params`` tree into Hydra ``_target_`` form (aliases applied).

    Keys beside ``target`` and ``params`` (``input_key``, ``is_trainable`` in a conditioner's
    ``emb_models``) become keyword arguments as well. Unknown targets fail here, before any
    object is built.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    if is_sgm_node(node):
        target = node["target"]
        resolve_target(target)  # fail early with a clear message
        out: dict[str, Any] = {"_target_": SGM_ALIASES.get(target, target)}
        for key, value in node.items():
            if key == "params":
                out.update({k: convert_sgm_config(v) for k, v in (value or {}).items()})
            elif key != "target":
                out[key] = convert_sgm_config(value)
        return out
    if isinstance(node, Mapping):
        return {k: convert_sgm_config(v) for k, v in node.items()}
    if isinstance(node, Sequence) and not isinstance(node, str):
        return [convert_sgm_config(v) for v in node]
    return node


def instantiate(node: Any, **overrides: Any) -> Any:
    """Build an object from an sgm node, a Hydra node, or return an already built object."""
    if node is None:
        return None
    if is_sgm_node(node):
        node = convert_sgm_config(node)
    if isinstance(node, Mapping) and "_target_" in node:
        from hydra.utils import instantiate as hydra_instantiate  # only configs need Hydra

        return hydra_instantiate(node, **overrides)
    if overrides:
        raise TypeError(f"cannot apply overrides {sorted(overrides)} to an already built {type(node).__name__}")
    return node


def build_part(name: str, obj: Any = None, config: Any = None, default: Any = None) -> Any:
    """One constructor argument that may come as an object (``name``) or an sgm dict (``name_config``)."""
    if obj is not None and config is not None:
        raise ValueError(f"give either {name} or {name}_config, not both")
    built = instantiate(obj if obj is not None else config)
    if built is None:
        if default is None:
            raise ValueError(f"{name} is required (an object, a _target_ node or an sgm {name}_config)")
        return default() if callable(default) else default
    return built


def load_sgm_yaml(path: str | Path, key: str | None = None) -> Any:
    """Instantiate an original sgm YAML file (or one node of it, e.g. ``key="model.params.denoiser_config"``)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    node = OmegaConf.select(cfg, key) if key else cfg
    if node is None:
        raise KeyError(f"{path} has no node {key!r}")
    return instantiate(convert_sgm_config(node))
