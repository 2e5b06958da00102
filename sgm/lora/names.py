"""Which layers of an engine can take LoRA, and their names in the files (reference/FORMATS.md).

A :class:`Target` is one adaptable layer: a UNet ``Linear``/``Conv2d`` (named by its sgm path
under ``model.diffusion_model.``), a CLIP-L ``Linear`` (named by its transformers-4 path
under ``text_model.``), or a bigG layer named as if bigG were a CLIP text model
(``resblocks.N`` -> ``encoder.layers.N``, the q/k/v row thirds of ``attn.in_proj_weight``
-> ``self_attn.q_proj/k_proj/v_proj``, ``attn.out_proj`` -> ``self_attn.out_proj``,
``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``). Kohya names are
``lora_unet_`` / ``lora_te1_text_model_`` / ``lora_te2_text_model_`` + the path with dots
replaced by underscores. :func:`unet_diffusers_paths` maps sgm UNet paths to diffusers'
``UNet2DConditionModel`` paths, for files named after diffusers modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from .spec import UNET_CONV_TARGETS, LoRASpec

PREFIXES = {"unet": "lora_unet_", "te1": "lora_te1_text_model_", "te2": "lora_te2_text_model_"}
# UNet layers a kohya LoRA never adapts by default (also excluded from include_conv)
_NEVER_DEFAULT = ("time_embed.", "label_emb.", "input_blocks.0.0", "out.")


@dataclass(frozen=True, eq=False)
class Target:
    """One adaptable layer. ``part`` is the row third (0 q, 1 k, 2 v) of an ``in_proj_weight``."""

    name: str
    group: str  # "unet" | "te1" | "te2"
    path: str   # sgm UNet path, or the CLIP path under text_model
    module: nn.Module
    part: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The weight this LoRA updates (a view of ``in_proj_weight`` for a q/k/v third)."""
        if self.part is None:
            return self.module.weight
        w = self.module.in_proj_weight
        n = w.shape[0] // 3
        return w[self.part * n : (self.part + 1) * n]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int] | None:
        return tuple(self.module.kernel_size) if self.is_conv else None

    def describe(self) -> str:
        kind = f"Conv2d {list(self.kernel_size)}" if self.is_conv else ("in_proj third" if self.part is not None else "Linear")
        return f"{self.name} ({kind}, in {self.in_features}, out {self.out_features})"


def kohya_name(group: str, path: str) -> str:
    return PREFIXES[group] + path.replace(".", "_")


def _adaptable(module: nn.Module | None) -> bool:
    """Linear layers and plain (ungrouped, undilated) 2-D convolutions take LoRA."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and tuple(module.dilation) == (1, 1)
    return isinstance(module, nn.Linear)


# ---------------------------------------------------------------------------- text encoders

def text_encoders(engine: nn.Module) -> dict[str, nn.Module]:
    """``{"te1": CLIP-L embedder, "te2": bigG embedder}`` of the engine, found by type (either may be absent)."""
    from ..conditioning.clip import FrozenCLIPEmbedder
    from ..conditioning.open_clip import FrozenOpenCLIPEmbedder2

    found: dict[str, list[nn.Module]] = {"te1": [], "te2": []}
    conditioner = getattr(engine, "conditioner", None)
    for emb in getattr(conditioner, "embedders", []):
        if isinstance(emb, FrozenCLIPEmbedder):
            found["te1"].append(emb)
        elif isinstance(emb, FrozenOpenCLIPEmbedder2):
            found["te2"].append(emb)
    for group, embs in found.items():
        if len(embs) > 1:
            raise ValueError(f"the engine has {len(embs)} {type(embs[0]).__name__} embedders; "
                             f"LoRA names ({PREFIXES[group]}...) are defined for one")
    return {g: e[0] for g, e in found.items() if e}


def _te1_targets(emb: nn.Module) -> list[Target]:
    return [Target(kohya_name("te1", p), "te1", p, m) for p, m in emb.text_model.named_modules() if _adaptable(m)]


def _te2_targets(emb: nn.Module) -> list[Target]:
    out = []
    for i, block in enumerate(emb.model.transformer.resblocks):
        base = f"encoder.layers.{i}."
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise TypeError(f"bigG block {i}: expected nn.MultiheadAttention with a fused in_proj_weight")
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            path = base + "self_attn." + proj
            out.append(Target(kohya_name("te2", path), "te2", path, attn, part))
        for path, module in ((base + "self_attn.out_proj", attn.out_proj), (base + "mlp.fc1", block.mlp.c_fc),
                             (base + "mlp.fc2", block.mlp.c_proj)):
            out.append(Target(kohya_name("te2", path), "te2", path, module))
    return out


# ---------------------------------------------------------------------------- UNet

def unet_of(engine: nn.Module) -> nn.Module:
    model = getattr(engine, "model", None)
    unet = getattr(model, "diffusion_model", None)
    if unet is None:
        raise ValueError(f"{type(engine).__name__} has no model.diffusion_model (a DiffusionEngine is expected)")
    return unet


def _unet_targets(unet: nn.Module) -> list[Target]:
    return [Target(kohya_name("unet", p), "unet", p, m) for p, m in unet.named_modules() if p and _adaptable(m)]


def all_targets(engine: nn.Module) -> dict[str, Target]:
    """Every layer of the engine that a LoRA file may adapt, by kohya name."""
    targets = _unet_targets(unet_of(engine))
    tes = text_encoders(engine)
    if "te1" in tes:
        targets += _te1_targets(tes["te1"])
    if "te2" in tes:
        targets += _te2_targets(tes["te2"])
    return {t.name: t for t in targets}


def _matches(path: str, pattern: str) -> bool:
    return fnmatchcase(path, pattern) or fnmatchcase(path, "*." + pattern)


def _select(candidates: list[tuple[str, nn.Module]], patterns: tuple[str, ...], param: str, where: str,
            required: bool = True) -> set[str]:
    """Paths of adaptable layers matched by ``patterns``; a required pattern that matches none is an error."""
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [(p, m) for p, m in candidates if _matches(p, pattern)]
        good = {p for p, m in hits if m is None or _adaptable(m)}
        if not good and required:
            if hits:
                kinds = sorted({type(m).__name__ for _, m in hits})
                raise ValueError(f"{param}: pattern {pattern!r} matches only {', '.join(kinds)} modules of the {where} "
                                 f"(e.g. {hits[0][0]!r}); LoRA adapts Linear and Conv2d layers: name those")
            raise ValueError(f"{param}: pattern {pattern!r} matches no layer of the {where}; "
                             f"examples of layer names: {[p for p, _ in candidates[:4]]}")
        chosen |= good
    return chosen


def select_targets(engine: nn.Module, spec: LoRASpec) -> list[Target]:
    """The layers ``spec`` adapts, in module order. Errors name the parameter whose pattern failed."""
    unet = unet_of(engine)
    unet_mods = [(p, m) for p, m in unet.named_modules() if p]
    paths = _select(unet_mods, tuple(spec.unet_targets), "unet_targets", "UNet")
    if spec.include_conv:
        blocks = [(p, m) for p, m in unet_mods if not p.startswith(_NEVER_DEFAULT) and isinstance(m, nn.Conv2d)]
        paths |= _select(blocks, UNET_CONV_TARGETS, "include_conv", "UNet", required=False)
    chosen = [t for t in _unet_targets(unet) if t.path in paths]
    if spec.train_text_encoders:
        tes = text_encoders(engine)
        if not tes:
            raise ValueError("train_text_encoders: the engine has no CLIP-L or bigG text encoder")
        for group, emb in tes.items():
            cands = _te1_targets(emb) if group == "te1" else _te2_targets(emb)
            picked = _select([(t.path, None) for t in cands], tuple(spec.text_encoder_targets), "text_encoder_targets",
                             f"{type(emb).__name__} text encoder (CLIP names)")
            group_targets = [t for t in cands if t.path in picked]
            if group == "te2":
                _check_whole_attention(group_targets)
            chosen += group_targets
    if not chosen:
        raise ValueError("the LoRA spec selects no layer")
    return chosen


def _check_whole_attention(targets: list[Target]) -> None:
    """bigG's four attention parts are written together (loaders rebuild in_proj from q/k/v)."""
    layers: dict[str, set[str]] = {}
    for t in targets:
        head, _, leaf = t.path.rpartition(".")
        if head.endswith("self_attn"):
            layers.setdefault(head, set()).add(leaf)
    for head, parts in layers.items():
        if parts != {"q_proj", "k_proj", "v_proj", "out_proj"}:
            raise ValueError(f"text_encoder_targets: bigG {head} would get only {sorted(parts)}; target all four "
                             f"attention parts (q_proj, k_proj, v_proj, out_proj) of a bigG layer together")


# ---------------------------------------------------------------------------- diffusers names

_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
          "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
          "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _block_prefixes(unet: nn.Module) -> dict[str, str]:
    """sgm block prefix (``input_blocks.4.1``) -> diffusers prefix (``down_blocks.1.attentions.0``)."""
    from ..networks.openaimodel import Downsample, ResBlock, Upsample
    from ..networks.transformer import SpatialTransformer

    def name(layer: nn.Module, level: int, j: int, kind: str) -> str | None:
        if isinstance(layer, ResBlock):
            return f"{kind}.{level}.resnets.{j}"
        if isinstance(layer, SpatialTransformer):
            return f"{kind}.{level}.attentions.{j}"
        if isinstance(layer, Downsample):
            return f"{kind}.{level}.downsamplers.0"
        if isinstance(layer, Upsample):
            return f"{kind}.{level}.upsamplers.0"
        return None

    out: dict[str, str] = {}
    nrb = list(unet.num_res_blocks)
    levels = len(nrb)
    k = 1
    for level in range(levels):
        for j in range(nrb[level] + (level != levels - 1)):
            for i, layer in enumerate(unet.input_blocks[k]):
                n = name(layer, level, j, "down_blocks")
                if n:
                    out[f"input_blocks.{k}.{i}"] = n
            k += 1
    counts = {"resnets": 0, "attentions": 0}
    for i, layer in enumerate(unet.middle_block):
        n = name(layer, 0, 0, "mid_block")
        if n:
            kind = n.split(".")[2]
            out[f"middle_block.{i}"] = f"mid_block.{kind}.{counts[kind]}"
            counts[kind] += 1
    k = 0
    for b, level in enumerate(reversed(range(levels))):
        for j in range(nrb[level] + 1):
            for i, layer in enumerate(unet.output_blocks[k]):
                n = name(layer, b, j, "up_blocks")
                if n:
                    out[f"output_blocks.{k}.{i}"] = n
            k += 1
    return out


def unet_diffusers_paths(unet: nn.Module) -> dict[str, str]:
    """sgm path -> diffusers ``UNet2DConditionModel`` path of every adaptable UNet layer (SDXL layout)."""
    blocks = _block_prefixes(unet)
    out = {}
    for path, module in unet.named_modules():
        if not path or not _adaptable(module):
            continue
        if path in _FIXED:
            out[path] = _FIXED[path]
            continue
        parts = path.split(".")
        prefix = ".".join(parts[:3])
        rest = ".".join(parts[3:])
        if parts[0] == "middle_block":
            prefix, rest = ".".join(parts[:2]), ".".join(parts[2:])
        new = blocks.get(prefix)
        if new is None:
            continue
        if ".resnets." in new:
            for ours, theirs in _RES.items():
                if rest == ours or rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours):]
                    break
        elif new.endswith(("downsamplers.0", "upsamplers.0")):
            rest = "conv"
        out[path] = f"{new}.{rest}" if rest else new
    return out


def diffusers_unet_names(engine: nn.Module) -> dict[str, Target]:
    """diffusers UNet path -> target (for ``unet.*`` PEFT keys and ``lora_unet_down_blocks_*`` kohya names)."""
    by_path = {t.path: t for t in _unet_targets(unet_of(engine))}
    return {d: by_path[s] for s, d in unet_diffusers_paths(unet_of(engine)).items() if s in by_path}
