"""Conditioning: the GeneralConditioner and its embedders (CLIP-L, OpenCLIP bigG, size embeddings).

Importing this package registers the original sgm dotted paths
(``sgm.modules.encoders.modules.FrozenCLIPEmbedder`` …) in :data:`sgm.config.SGM_ALIASES`.
"""

from ..config import register_alias
from .clip import VIT_L14_TEXT_CONFIG, FrozenCLIPEmbedder
from .conditioner import INPUT_WIDTHS, GeneralConditioner, build_embedder
from .embedders import BOS_ID, EOS_ID, AbstractEmbModel, tokenize
from .open_clip import FrozenOpenCLIPEmbedder2, text_tower_config
from .timestep import ConcatTimestepEmbedderND, timestep_embedding

_ENC = "sgm.modules.encoders.modules"
for _old, _new in {
    "sgm.modules.GeneralConditioner": "sgm.conditioning.GeneralConditioner",
    f"{_ENC}.GeneralConditioner": "sgm.conditioning.GeneralConditioner",
    f"{_ENC}.AbstractEmbModel": "sgm.conditioning.AbstractEmbModel",
    f"{_ENC}.FrozenCLIPEmbedder": "sgm.conditioning.FrozenCLIPEmbedder",
    f"{_ENC}.FrozenOpenCLIPEmbedder2": "sgm.conditioning.FrozenOpenCLIPEmbedder2",
    f"{_ENC}.ConcatTimestepEmbedderND": "sgm.conditioning.ConcatTimestepEmbedderND",
}.items():
    register_alias(_old, _new)

__all__ = [
    "AbstractEmbModel",
    "BOS_ID",
    "ConcatTimestepEmbedderND",
    "EOS_ID",
    "FrozenCLIPEmbedder",
    "FrozenOpenCLIPEmbedder2",
    "GeneralConditioner",
    "INPUT_WIDTHS",
    "VIT_L14_TEXT_CONFIG",
    "build_embedder",
    "text_tower_config",
    "timestep_embedding",
    "tokenize",
]
