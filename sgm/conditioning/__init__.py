"""Conditioning: the GeneralConditioner and its embedders (CLIP-L, OpenCLIP bigG, size embeddings).

The original sgm dotted paths (``sgm.modules.encoders.modules.FrozenCLIPEmbedder`` …) map
here through :data:`sgm.config.SGM_ALIASES`.
"""

from .clip import VIT_L14_TEXT_CONFIG, FrozenCLIPEmbedder
from .conditioner import INPUT_WIDTHS, GeneralConditioner, build_embedder
from .embedders import BOS_ID, EOS_ID, AbstractEmbModel, tokenize
from .open_clip import FrozenOpenCLIPEmbedder2, text_tower_config
from .timestep import ConcatTimestepEmbedderND, timestep_embedding

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
