"""What a LoRA run adapts and how: :class:`LoRASpec` (built by Hydra from ``conf/lora/*.yaml``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

#: kohya's default UNet targets: every Linear/1x1 layer of the transformer blocks
#: (722 modules on SDXL base). Suffix patterns over sgm module paths, ``*`` wildcards allowed.
DEFAULT_UNET_TARGETS: tuple[str, ...] = (
    "proj_in", "proj_out",
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
#: ``include_conv`` adds these ResBlock / resampling convolutions (kohya's LoCon ``conv_dim``);
#: layers that are no convolution in a given block (an Identity skip connection) are skipped.
UNET_CONV_TARGETS: tuple[str, ...] = ("in_layers.2", "out_layers.3", "skip_connection", "op", "conv")
#: Text-encoder targets, in CLIP names (bigG is named as if it were a CLIP text model):
#: attention projections and both MLP layers.
DEFAULT_TE_TARGETS: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
)
INITS = ("kohya", "gaussian")
T = TypeVar("T")


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of module-name patterns, got {value!r}")
    out = tuple(str(v) for v in value)
    bad = [p for p in out if not p or p != p.strip() or p.startswith(".") or p.endswith(".")]
    if bad:
        raise ValueError(f"{name} has malformed patterns {bad}; use dotted module-name suffixes like 'attn1.to_q'")
    return out


@dataclass
class LoRASpec:
    """LoRA hyper-parameters and targets.

    ``rank`` (>= 1) and ``alpha`` (> 0): the update is ``alpha / rank * up @ down``.
    ``dropout`` in [0, 1): dropout on the adapter input while training (not applied to
    bigG's q/k/v thirds, whose update is added to the fused weight).
    ``unet_targets``: suffix patterns over UNet module paths (``fnmatch`` wildcards); each
    must match at least one Linear/Conv2d layer. ``include_conv`` adds
    :data:`UNET_CONV_TARGETS` with ``conv_rank`` / ``conv_alpha`` (default: rank / alpha)
    for the 3x3 kernels. ``train_text_encoders`` also adapts the CLIP-L and bigG text
    encoders at ``text_encoder_targets`` (CLIP names). ``init``: ``kohya`` (down
    kaiming-uniform a=sqrt(5), as kohya and PEFT) or ``gaussian`` (down ~ N(0, 1/rank));
    up is always zero, so a fresh adapter changes nothing.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    unet_targets: Sequence[str] = field(default=DEFAULT_UNET_TARGETS)
    train_text_encoders: bool = False
    text_encoder_targets: Sequence[str] = field(default=DEFAULT_TE_TARGETS)
    include_conv: bool = False
    conv_rank: int | None = None
    conv_alpha: float | None = None
    init: str = "kohya"

    def __post_init__(self) -> None:
        self.rank = _positive_int("rank", self.rank)
        self.alpha = _positive_float("alpha", self.alpha)
        self.conv_rank = self.rank if self.conv_rank is None else _positive_int("conv_rank", self.conv_rank)
        self.conv_alpha = self.alpha if self.conv_alpha is None else _positive_float("conv_alpha", self.conv_alpha)
        self.dropout = _checked("dropout", self.dropout, "a number", "in [0, 1)", float, lambda v: 0.0 <= v < 1.0)
        self.unet_targets = _patterns("unet_targets", self.unet_targets)
        self.text_encoder_targets = _patterns("text_encoder_targets", self.text_encoder_targets)
        if not isinstance(self.train_text_encoders, bool) or not isinstance(self.include_conv, bool):
            raise ValueError("train_text_encoders and include_conv must be true or false")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not self.unet_targets and not self.include_conv and not self.train_text_encoders:
            raise ValueError("unet_targets is empty and neither include_conv nor train_text_encoders is set: nothing to adapt")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], prefix: str = "lora") -> "LoRASpec":
        """A spec from config values; errors name the parameter under ``prefix`` (``lora.rank must be ...``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{prefix} has no parameter {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        missing = sorted(f.name for f in fields(cls) if f.name not in params
                         and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise ValueError(f"{prefix} needs {', '.join(missing)} (e.g. {prefix}.rank=16 {prefix}.alpha=16)")
        try:
            return cls(**params)
        except ValueError as exc:  # every message starts with the parameter's name
            raise ValueError(f"{prefix}.{exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "unet_targets": list(self.unet_targets),
                "train_text_encoders": self.train_text_encoders, "text_encoder_targets": list(self.text_encoder_targets),
                "include_conv": self.include_conv, "conv_rank": self.conv_rank, "conv_alpha": self.conv_alpha,
                "init": self.init}


def _checked(name: str, value: Any, kind: str, bound: str, parse: Callable[[Any], T],
             ok: Callable[[T], bool]) -> T:
    """``parse(value)`` if that works and passes ``ok``, else a ValueError naming the parameter:
    "``name`` must be ``kind`` ``bound``" (not parseable) or "``name`` must be ``bound``" (out of range)."""
    try:
        parsed = parse(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind} {bound}, got {value!r}") from None
    if not ok(parsed):
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return parsed


def _integer(value: Any) -> int:
    """An int, or a float with an integral value, as int (bools and anything else: TypeError)."""
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise TypeError(f"not an integer: {value!r}")
    return int(value)


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, else a ValueError naming ``name``."""
    return _checked(name, value, "an integer", ">= 1", _integer, lambda v: v >= 1)


def _positive_float(name: str, value: Any) -> float:
    """``value`` as a finite float > 0, else a ValueError naming ``name``."""
    return _checked(name, value, "a number", "> 0", float, lambda v: 0.0 < v < math.inf)
