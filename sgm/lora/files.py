"""LoRA files: write kohya files, read kohya / diffusers / PEFT files and merge them for sampling.

Written (reference/FORMATS.md): ``<kohya name>.lora_down.weight`` [r, in] (conv
[r, in, kh, kw]), ``.lora_up.weight`` [out, r] (conv [out, r, 1, 1]), ``.alpha`` (0-d,
float32) per module, nothing else; metadata strings ``ss_network_module``,
``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version`` and ``sgm_*`` keys.

Read: kohya files named after sgm modules (``lora_unet_input_blocks_4_1_…``) or diffusers
modules (``lora_unet_down_blocks_1_attentions_0_…``), ``lora_te1_``/``lora_te2_`` text
encoders; diffusers/PEFT files (``unet.<diffusers path>.lora_A.weight`` / ``lora_B``, also
``text_encoder.`` / ``text_encoder_2.``, the older ``.lora.down/up`` and ``*_lora.down/up``
spellings), alpha from ``.alpha`` tensors, the ``lora_adapter_metadata`` diffusers writes,
or = rank. Every key must name a layer of this model with matching shapes, else one
error lists the offenders (and what the file looks like) before any weight changes.

Checked without the model: :func:`check_lora_file` reads a file's safetensors header only
(no tensor data) and refuses what cannot be a LoRA file of a known naming, so run.py
fails on it before any weight is read; :func:`parse_lora_key` is the one reading of the
tensor names, shared with :func:`resolve_lora`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.paths import existing_file
from .delta import lora_delta, merge_delta
from .layers import lora_network
from .names import Target, all_targets, diffusers_unet_names, kohya_name, text_encoders, unet_of

log = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
_NOT_PLAIN_LORA = {"dora_scale": "DoRA", "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "lora_mid": "LoCon/Tucker",
                   "oft_": "OFT", "diff": "full-weight diff", "b_norm": "norm tuning", "w_norm": "norm tuning",
                   "lora_magnitude_vector": "DoRA"}
_COMP = r"(?P<comp>unet|text_encoder|text_encoder_2)"
_PEFT_AB = re.compile(_COMP + r"\.(?P<path>.+)\.lora_(?P<ab>A|B)(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_PEFT_OLD = re.compile(_COMP + r"\.(?P<path>.+)\.lora(?:_linear_layer)?\.(?P<ud>down|up)\.weight$")
_PEFT_PROC = re.compile(_COMP + r"\.(?P<path>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
_PEFT_ALPHA = re.compile(_COMP + r"\.(?P<path>.+)\.alpha$")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_GROUP_OF_COMP = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}


class LoRAFileError(ValueError):
    """A LoRA file that does not fit this model (unknown modules, wrong shapes, unsupported kind)."""


# ---------------------------------------------------------------------------- writing

def lora_state_dict(engine: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The trained adapters as kohya tensors: ``.lora_down.weight``, ``.lora_up.weight`` and 0-d float32 ``.alpha``."""
    net = lora_network(engine)
    out: dict[str, torch.Tensor] = {}
    for name, adapter in net.items():
        for part in ("lora_down", "lora_up"):
            w = getattr(adapter, part).weight.detach()
            out[f"{name}.{part}.weight"] = w.to(dtype) if dtype is not None else w
        out[f"{name}.alpha"] = adapter.alpha.detach().float().reshape(())
    return out


def base_model_version(engine: nn.Module) -> str:
    """``ss_base_model_version``: SDXL base layout (CLIP-L + bigG) or refiner layout (bigG only)."""
    tes = set(text_encoders(engine))
    return "sdxl_refiner_v1-0" if tes == {"te2"} else "sdxl_base_v1-0"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def lora_metadata(engine: nn.Module) -> dict[str, str]:
    """kohya / AUTOMATIC1111 metadata of the engine's adapters, plus ``sgm_*`` facts about the model."""
    net = lora_network(engine)
    spec = net.spec
    unet = unet_of(engine)
    md = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": _num(spec.alpha),
        "ss_base_model_version": base_model_version(engine),
        "ss_v2": "False",
        "ss_network_train_unet_only": str(not spec.train_text_encoders),
        "ss_network_dropout": _num(spec.dropout),
        "sgm_lora_spec": json.dumps(spec.as_dict()),
        "sgm_model": json.dumps({"model_channels": getattr(unet, "model_channels", None),
                                 "channel_mult": list(getattr(unet, "channel_mult", []) or []),
                                 "text_encoders": sorted(text_encoders(engine)),
                                 "sdxl_size": getattr(unet, "model_channels", None) in (320, 384)}),
        "sgm_modules": str(len(net)),
    }
    if spec.include_conv:
        md["ss_network_args"] = json.dumps({"conv_dim": str(spec.conv_rank), "conv_alpha": _num(spec.conv_alpha)})
    return md


def save_lora(engine: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
              dtype: torch.dtype | str = torch.float16) -> Path:
    """Write the engine's adapters as a kohya safetensors file, atomically (tmp file + ``os.replace``).

    ``metadata``: extra entries (non-strings are JSON-encoded); they may override ours.
    ``dtype``: of down/up (``.alpha`` is always float32).
    """

    from ..checkpoint import parse_dtype, write_safetensors

    sd = lora_state_dict(engine, parse_dtype(dtype))
    if any(t.is_meta for t in sd.values()):
        raise ValueError("the adapters are on the meta device (no data): nothing to save")
    md = lora_metadata(engine)
    md.update({str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()})
    return write_safetensors({k: v.contiguous().cpu() for k, v in sd.items()}, path, md)


# ---------------------------------------------------------------------------- reading

def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file (``.pt``/``.ckpt``/``.bin``: ``torch.load(weights_only=True)``)."""
    path = existing_file(path, "LoRA file", "LoRA file", directory_error=LoRAFileError)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:  # noqa: BLE001 - a corrupt header surfaces as several error types
            raise LoRAFileError(f"{path} is not a readable safetensors file: {exc}") from exc
    return _torch_state_dict(path), {}


def _torch_state_dict(path: Path, what: str = "LoRA file", mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save file, read with ``weights_only=True``; ``mmap``: mapped, not read
    (where the format allows it: the legacy non-zip format is read)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: refuse
        raise LoRAFileError(f"{what} {str(path)!r} could not be read with torch.load(weights_only=True) "
                            f"({type(exc).__name__}: {exc}); LoRA files are .safetensors or torch.save files") from exc
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise LoRAFileError(f"{what} {str(path)!r} holds no state dict")
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


@dataclass(frozen=True)
class LoRAKey:
    """What one tensor name of a LoRA file says, before it is matched to a model's layers.

    ``naming``: ``kohya`` (``module`` is the kohya module name, sgm or diffusers spelling) or
    ``peft`` (``module`` is the module path inside ``comp``: unet / text_encoder /
    text_encoder_2). ``part``: down / up / alpha, or None for a tensor of another adapter
    kind (``unsupported`` says which)."""

    naming: str
    module: str
    part: str | None
    comp: str | None = None
    unsupported: str | None = None


_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def parse_lora_key(key: str) -> LoRAKey | None:
    """The LoRA meaning of a tensor name (kohya or diffusers/PEFT spellings), or None when it has none."""
    if key.startswith(KOHYA_PREFIXES):
        module, _, suffix = key.partition(".")
        part = _KOHYA_PARTS.get(suffix)
        if part is None:
            kind = next((v for s, v in _NOT_PLAIN_LORA.items() if suffix.startswith(s)), "unknown")
            return LoRAKey("kohya", module, None, unsupported=kind)
        return LoRAKey("kohya", module, part)
    m = _PEFT_PROC.match(key)
    if m:
        comp, proj = m["comp"], m["proj"]
        if comp == "unet":
            path = f"{m['path']}.{proj}" + (".0" if proj == "to_out" else "")
        else:
            path = f"{m['path']}.{_TE_PROJ[proj]}"
        return LoRAKey("peft", path, m["ud"], comp)
    m = _PEFT_AB.match(key) or _PEFT_OLD.match(key)
    if m:
        part = ("down" if m["ab"] == "A" else "up") if "ab" in m.groupdict() else m["ud"]
        return LoRAKey("peft", m["path"], part, m["comp"])
    m = _PEFT_ALPHA.match(key)
    if m:
        return LoRAKey("peft", m["path"].removesuffix(".processor"), "alpha", m["comp"])
    return None


@dataclass
class LoRAWeights:
    """One module's LoRA from a file, resolved to a layer of this model."""

    target: Target
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta_shape(self) -> tuple[int, ...] | None:
        """Shape of ``up @ down`` in the target's layout (None: not composable into it)."""
        down, up = self.down, self.up
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
            return None
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            return None
        kernel = tuple(down.shape[2:]) if down.ndim == 4 else (1, 1)
        if len(self.target.shape) == 2:
            return (up.shape[0], down.shape[1]) if kernel == (1, 1) else None
        return (up.shape[0], down.shape[1], *kernel)

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """``strength * alpha / r * up @ down`` in float32 on the target's device, shaped like its weight."""
        device = self.target.weight.device
        down = self.down.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32)
        return lora_delta(up, down, strength * self.alpha / self.rank, self.delta_shape())


def _peft_alphas(metadata: dict[str, str]) -> dict[str, tuple[float | None, dict[str, float]]]:
    """component -> (lora_alpha, alpha_pattern) from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        md = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for comp in _GROUP_OF_COMP:
        alpha = md.get(f"{comp}.lora_alpha")
        pattern = md.get(f"{comp}.alpha_pattern") or {}
        if alpha is not None or pattern:
            out[comp] = (None if alpha is None else float(alpha), {str(k): float(v) for k, v in pattern.items()})
    return out


def guess_kind(keys: Sequence[str], metadata: dict[str, str] | None = None) -> str:
    """What a LoRA file seems to be made for, from its key names and metadata (for error messages)."""
    metadata = metadata or {}
    ks = list(keys)
    hint = ""
    for key in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name"):
        if metadata.get(key):
            hint += f", {key}={metadata[key]!r}"

    def has(*subs: str) -> bool:
        return any(s in k for k in ks for s in subs)

    if has("double_blocks", "single_blocks", "single_transformer_blocks"):
        kind = "a FLUX LoRA"
    elif any(k.startswith(("transformer.", "lora_transformer_", "diffusion_model.")) for k in ks):
        kind = "a LoRA for a DiT model (SD3, FLUX, ...)"
    elif any(k.startswith("lora_te_") for k in ks):
        kind = "an SD 1.x/2.x LoRA (one text encoder: lora_te_)"
    elif has("down_blocks_0_attentions", "down_blocks.0.attentions", "input_blocks_1_1_", "input_blocks_2_1_"):
        kind = "an SD 1.x/2.x-layout LoRA (attention at the first UNet level, which SDXL has not)"
    elif has("lora_te1_", "lora_te2_", "text_encoder_2.", "input_blocks_4_1_", "down_blocks_1_attentions"):
        kind = "an SDXL-layout LoRA (for a model of other widths or depths than this one?)"
    else:
        kind = "of an unknown kind"
    return kind + hint


def _shortlist(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _unsupported_message(source: str, unsupported: dict[str, str]) -> str:
    kinds = sorted(set(unsupported.values()))
    return (f"{source}: not a plain LoRA file ({', '.join(kinds)} tensors such as "
            f"{_shortlist(list(unsupported), 3)}); only lora_down/lora_up/alpha LoRA is supported")


def resolve_lora(engine: nn.Module, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 source: str = "LoRA state dict") -> list[LoRAWeights]:
    """Map a LoRA state dict in any supported naming onto this engine's layers, validating keys and shapes."""
    metadata = metadata or {}
    targets = all_targets(engine)
    by_diffusers = diffusers_unet_names(engine)
    kohya_diffusers = {"lora_unet_" + p.replace(".", "_"): t for p, t in by_diffusers.items()}
    by_sgm_path = {t.path: t for t in targets.values() if t.group == "unet"}
    parts: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    unsupported: dict[str, str] = {}

    def put(target: Target | None, kind: str, key: str, value: torch.Tensor, comp: str | None = None) -> None:
        if target is None:
            unknown.append(key)
            return
        entry = parts.setdefault(target.name, {"target": target, "comp": comp, "keys": []})
        if kind in entry:
            raise LoRAFileError(f"{source}: two entries for {target.name}.{kind} ({entry['keys'][-1]!r} and {key!r})")
        entry[kind] = value
        entry["keys"].append(key)

    def target_of(parsed: LoRAKey) -> Target | None:
        if parsed.naming == "kohya":
            return targets.get(parsed.module) or kohya_diffusers.get(parsed.module)
        group = _GROUP_OF_COMP[parsed.comp]
        if group == "unet":
            return by_diffusers.get(parsed.module) or by_sgm_path.get(parsed.module)
        return targets.get(kohya_name(group, parsed.module.removeprefix("text_model.")))

    for key, value in state_dict.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            unknown.append(key)
        elif parsed.part is None:
            unsupported[key] = parsed.unsupported or "unknown"
        else:
            put(target_of(parsed), parsed.part, key, value, parsed.comp)

    if unsupported:
        raise LoRAFileError(_unsupported_message(source, unsupported))
    if unknown:
        n_mod = len({k.split('.')[0] if k.startswith(KOHYA_PREFIXES) else k for k in unknown})
        raise LoRAFileError(
            f"{source}: {n_mod} LoRA module(s) do not exist in this model, e.g. {_shortlist(unknown)}. "
            f"The file looks like {guess_kind(list(state_dict), metadata)}; this model is "
            f"{base_model_version(engine)}-like (UNet model_channels={getattr(unet_of(engine), 'model_channels', '?')}, "
            f"text encoders {sorted(text_encoders(engine)) or 'none'}). Nothing was merged.")

    peft_alpha = _peft_alphas(metadata)
    out: list[LoRAWeights] = []
    bad: list[str] = []
    for name, e in parts.items():
        if "down" not in e or "up" not in e:
            bad.append(f"{name}: has {sorted(k for k in ('down', 'up', 'alpha') if k in e)} only")
            continue
        rank = int(e["down"].shape[0])
        alpha = e.get("alpha")
        if alpha is not None:
            alpha = float(alpha.float().reshape(-1)[0])
        elif e["comp"] in peft_alpha:
            base, pattern = peft_alpha[e["comp"]]
            path = e["keys"][0].split(".", 1)[1].rsplit(".lora", 1)[0]
            hit = [v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", path)]
            alpha = hit[0] if hit else (base if base is not None else rank)
        else:
            alpha = float(rank)
        w = LoRAWeights(e["target"], e["down"], e["up"], alpha)
        if w.delta_shape() != w.target.shape:
            bad.append(f"{name}: down {list(w.down.shape)}, up {list(w.up.shape)} vs model weight {list(w.target.shape)}")
            continue
        out.append(w)
    if bad:
        raise LoRAFileError(f"{source}: {len(bad)} module(s) do not fit this model's layer shapes:\n  "
                            + "\n  ".join(bad[:8]) + (f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else "")
                            + f"\nThe file looks like {guess_kind(list(state_dict), metadata)}. Nothing was merged.")
    return out


# ---------------------------------------------------------------------------- header-only check

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def read_safetensors_header(path: str | os.PathLike, what: str = "LoRA file"
                            ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file from its JSON header alone; no tensor data is read.

    Raises :class:`LoRAFileError` naming ``what`` and the file when it is not a safetensors file
    (a header length that does not fit the file, a header that is not JSON, entries whose data
    lies outside the file)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
            raise LoRAFileError(f"{what} {str(path)!r} is not a safetensors file: its first 8 bytes do not give "
                                f"a header length that fits the file ({size} bytes); another format renamed?")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both are ValueErrors
        raise LoRAFileError(f"{what} {str(path)!r} is not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise LoRAFileError(f"{what} {str(path)!r} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise LoRAFileError(f"{what} {str(path)!r}: the header's entry for tensor {key!r} points outside the "
                                f"file's {data_bytes} data bytes (a truncated or damaged file?)")
    return header, {str(k): str(v) for k, v in metadata.items()}


def lora_naming(keys: Sequence[str]) -> str:
    """The naming of a LoRA file's tensors: kohya with sgm or diffusers module names, PEFT, or a mix."""
    parsed = [p for p in map(parse_lora_key, keys) if p is not None and p.part is not None]
    kinds = set()
    for p in parsed:
        if p.naming == "peft":
            kinds.add("PEFT/diffusers")
        elif p.module.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")):
            kinds.add("kohya (sgm names)")
        elif p.module.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")):
            kinds.add("kohya (diffusers names)")
        else:
            kinds.add("kohya (text encoders)")
    if len(kinds) > 1:  # text-encoder modules are named alike in both kohya spellings
        kinds.discard("kohya (text encoders)")
    return " + ".join(sorted(kinds))


def check_lora_file(path: str | os.PathLike, what: str = "LoRA file") -> str:
    """Check a LoRA file without reading its weights; return its naming (:func:`lora_naming`).

    The file must exist and be readable, be a safetensors file (header only) or a torch.save
    file, and every tensor must be a plain LoRA tensor (``lora_down``/``lora_up``/``alpha``, or
    PEFT ``lora_A``/``lora_B``) of a known naming. Whether its modules exist in the model is
    :func:`resolve_lora`'s check, once the model is built. Errors name ``what`` and the file."""
    path = existing_file(path, what, "LoRA file", directory_error=LoRAFileError)
    try:
        if path.suffix == ".safetensors":
            header, metadata = read_safetensors_header(path, what)
            keys = list(header)
        else:
            keys, metadata = list(_torch_state_dict(path, what, mmap=True)), {}
    except OSError as exc:
        raise LoRAFileError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    if not keys:
        raise LoRAFileError(f"{what} {str(path)!r} holds no tensors")
    parsed = {k: parse_lora_key(k) for k in keys}
    unsupported = {k: p.unsupported or "unknown" for k, p in parsed.items() if p is not None and p.part is None}
    if unsupported:
        raise LoRAFileError(_unsupported_message(f"{what} {str(path)!r}", unsupported))
    unknown = [k for k, p in parsed.items() if p is None]
    if len(unknown) == len(keys):
        raise LoRAFileError(
            f"{what} {str(path)!r} is not a LoRA file: none of its {len(keys)} tensors has a kohya LoRA name "
            f"(lora_unet_* / lora_te1_* / lora_te2_* with .lora_down.weight, .lora_up.weight, .alpha) or a PEFT one "
            f"(unet.* / text_encoder.* with .lora_A.weight, .lora_B.weight), e.g. {_shortlist(unknown, 3)}. "
            f"A model checkpoint belongs in weights.checkpoint.")
    if unknown:
        raise LoRAFileError(f"{what} {str(path)!r}: {len(unknown)} of its tensors are not LoRA tensors of a known "
                            f"naming, e.g. {_shortlist(unknown, 3)}; the file looks like {guess_kind(keys, metadata)}")
    return lora_naming(keys)


# ---------------------------------------------------------------------------- merging

class LoRAMerge:
    """Handle of LoRA files merged into an engine's weights; :meth:`unmerge` restores them.

    With ``exact`` (default) the original weights of the touched layers are kept (on the
    CPU) and restored bit for bit; otherwise the deltas are recomputed and subtracted.
    Merges stack: unmerge the latest first. Usable as a context manager.
    """

    def __init__(self, engine: nn.Module, items: list[tuple[LoRAWeights, float]],
                 originals: list[tuple[Target, torch.Tensor]] | None, files: list[str]):
        self.engine = engine
        self.items = items
        self.originals = originals
        self.files = files
        self.merged = True

    @property
    def names(self) -> list[str]:
        return sorted({w.target.name for w, _ in self.items})

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        stack = self.engine.__dict__.get("_lora_merges", [])
        if stack and stack[-1] is not self:
            raise RuntimeError("unmerge the LoRA merges made after this one first (they were merged on top of it)")
        if self.originals is not None:
            for target, original in self.originals:
                target.weight.copy_(original)
        else:
            for w, strength in reversed(self.items):
                merge_delta(w.target.weight, w.delta(strength), unmerge=True)
        if stack:
            stack.pop()
        self.merged = False

    def __enter__(self) -> "LoRAMerge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unmerge()


@torch.no_grad()
def load_lora_files(engine: nn.Module, files: str | os.PathLike | Sequence[str | os.PathLike],
                    strengths: float | Sequence[float] | None = None, exact: bool = True) -> LoRAMerge:
    """Merge LoRA files into the engine's weights: ``W += strength * alpha / r * up @ down``.

    All files are read and validated first (unknown modules, shapes); only then is anything
    merged. Strength 0 leaves a file out (exactly the base weights). Returns the handle
    whose :meth:`LoRAMerge.unmerge` restores the weights.
    """
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if strengths is None:
        strengths = [1.0] * len(files)
    elif isinstance(strengths, (int, float)):
        strengths = [float(strengths)] * len(files)
    strengths = [float(s) for s in strengths]
    if len(strengths) != len(files):
        raise ValueError(f"{len(files)} LoRA file(s) but {len(strengths)} strength(s)")
    resolved = []
    for f in files:
        sd, md = read_lora_file(f)
        resolved.append(resolve_lora(engine, sd, md, source=str(f)))
    items = [(w, s) for ws, s in zip(resolved, strengths) if s != 0.0 for w in ws]
    originals: list[tuple[Target, torch.Tensor]] | None = [] if exact else None
    if exact:
        seen: set[tuple[int, int | None]] = set()
        for w, _ in items:
            key = (id(w.target.module), w.target.part)
            if key not in seen:
                seen.add(key)
                originals.append((w.target, w.target.weight.detach().to("cpu", copy=True)))
    for w, s in items:
        merge_delta(w.target.weight, w.delta(s))
    handle = LoRAMerge(engine, items, originals, [str(f) for f in files])
    engine.__dict__.setdefault("_lora_merges", []).append(handle)
    log.info("merged %d LoRA module(s) from %d file(s)", len(items), len(files))
    return handle


def unmerge_lora(engine: nn.Module, handle: LoRAMerge) -> None:
    """Restore the weights a :func:`load_lora_files` call changed (same as ``handle.unmerge()``)."""
    if handle.engine is not engine:
        raise ValueError("this handle belongs to another engine")
    handle.unmerge()
