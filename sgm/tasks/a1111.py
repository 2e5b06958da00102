"""AUTOMATIC1111's ``parameters`` PNG text ("infotext"): writing it for our images and reading it back.

The format (stable-diffusion-webui, ``processing.create_infotext``; read by image browsers and
civitai): the prompt, then ``Negative prompt: ...`` when there is one (both may span lines),
then one line of ``Key: value`` fields joined by ``, ``; a value holding ``,``, ``:`` or a
newline is written as a JSON string. The last line counts as the fields line when it holds at
least three fields. Each line is read with its surrounding whitespace stripped (as the web UI
reads it), so a prompt line's leading or trailing spaces do not come back.

Hashes as the web UI writes them: ``Model hash`` is the first 10 hex digits of the checkpoint
file's sha256 ("AutoV2"); ``Lora hashes`` gives each LoRA's first 12 hex digits of the sha256
of its safetensors data after the header (the web UI's "addnet" hash, civitai's AutoV3; other
files: of the whole file). Hashes are cached per file (path, size, modification time), in
memory and, for files over 256 MiB, in ``~/.cache/sgm/hashes.json`` (``$SGM_CACHE_DIR``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = ["Parameters", "format_parameters", "parse_parameters", "model_hash", "lora_hash", "run_fields"]

NEGATIVE = "Negative prompt:"

#: our sampler classes -> the web UI's sampler names (others keep their conf/sampler name)
SAMPLER_NAMES = {
    "EulerEDMSampler": "Euler", "EulerAncestralSampler": "Euler a", "HeunEDMSampler": "Heun",
    "LinearMultistepSampler": "LMS", "DPM2Sampler": "DPM2", "DPM2AncestralSampler": "DPM2 a",
    "DPMPP2SAncestralSampler": "DPM++ 2S a", "DPMPPSDESampler": "DPM++ SDE", "DPMPP2MSampler": "DPM++ 2M",
    "DPMPP2MSDESampler": "DPM++ 2M SDE", "DPMPP3MSDESampler": "DPM++ 3M SDE", "DPMSolverFastSampler": "DPM fast",
    "DPMSolverAdaptiveSampler": "DPM adaptive", "DDIMSampler": "DDIM", "UniPCSampler": "UniPC",
    "LCMSampler": "LCM", "RestartSampler": "Restart",
}
#: our discretization classes -> the web UI's schedule types ("Karras" only at rho 7)
SCHEDULE_NAMES = {
    "ExponentialDiscretization": "Exponential", "PolyExponentialDiscretization": "Polyexponential",
    "SGMUniformDiscretization": "SGM Uniform", "SimpleDiscretization": "Simple", "NormalDiscretization": "Normal",
    "BetaDiscretization": "Beta", "AlignYourStepsDiscretization": "Align Your Steps",
    "KLOptimalDiscretization": "KL Optimal", "DDIMUniformDiscretization": "DDIM",
}


@dataclass
class Parameters:
    """An infotext read back: the prompt, the negative prompt and the fields in their order."""

    prompt: str
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def format_parameters(prompt: str, negative_prompt: str, fields: dict[str, Any]) -> str:
    """The infotext of one image; fields whose value is None are left out."""
    line = ", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items() if v is not None)
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _fields(line: str) -> dict[str, str]:
    """``Key: value, Key: "json", ...`` -> {key: value}; a piece that is no field is skipped."""
    out, i, n = {}, 0, len(line)
    while i < n:
        colon = line.find(":", i)
        if colon < 0:
            break
        key, j = line[i:colon].strip(), colon + 1
        while j < n and line[j] == " ":
            j += 1
        if j < n and line[j] == '"':  # a JSON string: up to the first unescaped quote
            k = j + 1
            while k < n and line[k] != '"':
                k += 2 if line[k] == "\\" else 1
            raw, i = line[j:k + 1], k + 1
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        else:
            end = line.find(",", j)
            end = n if end < 0 else end
            value, i = line[j:end].strip(), end
        if key and all(c.isalnum() or c in " -_/" for c in key) and (key[0].isalnum() or key[0] == "_"):
            out[key] = value
        while i < n and line[i] in ", ":
            i += 1
    return out


def parse_parameters(text: str) -> Parameters:
    """Read an infotext (ours or the web UI's)."""
    *lines, last = text.strip().split("\n")
    fields = _fields(last)
    if len(fields) < 3:
        lines, fields = [*lines, last], {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE) and not in_negative:
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return Parameters("\n".join(prompt), "\n".join(negative), fields)


PERSIST_HASHES_FROM = 256 * 2**20  # files this large (checkpoints) keep their hash on disk across runs


def _hash_cache_file() -> Path:
    """Where large files' hashes are kept between runs (as the web UI keeps its cache.json):
    ``$SGM_CACHE_DIR`` or ``~/.cache/sgm``, file ``hashes.json``."""
    return Path(os.environ.get("SGM_CACHE_DIR") or Path.home() / ".cache" / "sgm") / "hashes.json"


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, skip_header: bool) -> str:
    if size < PERSIST_HASHES_FROM:
        return _compute_sha256(path, skip_header)
    key, cache_file = f"{path}|{size}|{mtime_ns}|{int(skip_header)}", _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:  # a multi-GB checkpoint is hashed once, not at the start of every run
        cache[key] = _compute_sha256(path, skip_header)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError as exc:  # a read-only home: the hash is still right, only not kept
            log.debug("hash cache %s not written: %s", cache_file, exc)
    return cache[key]


def _compute_sha256(path: str, skip_header: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_hash(path: str | Path, skip_header: bool) -> str:
    p = Path(str(path)).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns, skip_header)


def model_hash(path: str | Path) -> str:
    """The web UI's short checkpoint hash: sha256 of the file, first 10 hex digits."""
    return _file_hash(path, skip_header=False)[:10]


def lora_hash(path: str | Path) -> str:
    """The web UI's LoRA hash: sha256 of a safetensors file's data after its header (of the whole
    file otherwise), first 12 hex digits."""
    return _file_hash(path, skip_header=str(path).endswith(".safetensors"))[:12]


def _target_name(node: Any) -> str:
    return str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]


def sampler_name(node: Any, choice: str | None = None) -> str:
    """The web UI's name of the sampler a ``sampler`` config node builds, else ``choice`` (its conf name)."""
    cls = _target_name(node)
    name = SAMPLER_NAMES.get(cls)
    if cls == "DPMPP2MSDESampler" and str(node.get("solver_type", "midpoint")) == "heun":
        name = "DPM++ 2M SDE Heun"
    return name or choice or cls


def schedule_name(node: Any, choice: str | None = None) -> str:
    """The web UI's schedule type of a ``discretization`` node, else ``choice`` (its conf name)."""
    cls = _target_name(node)
    if cls == "EDMDiscretization" and float(node.get("rho", 7.0)) == 7.0:
        return "Karras"
    return SCHEDULE_NAMES.get(cls) or choice or cls


def _choices() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return {str(k): str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except ValueError:  # no Hydra run (a script building parts itself)
        return {}


def _model_fields(weights: Any, choice: str | None) -> tuple[str | None, str | None]:
    checkpoint = (weights or {}).get("checkpoint")
    if checkpoint:
        return model_hash(checkpoint), Path(str(checkpoint)).stem
    return None, choice


def run_fields(cfg: DictConfig, steps: int, H: int, W: int, strength: float,
               lora_files: list[str]) -> dict[str, str | None]:
    """The infotext fields a run shares (``Seed`` is a placeholder each image fills), in the web UI's order.

    Hashes are computed here, once per run."""
    import sgm

    choices = _choices()
    guider = cfg.get("guider") or {}
    scale = guider.get("scale") if hasattr(guider, "get") else None
    mhash, model = _model_fields(cfg.get("weights"), choices.get("model"))
    fields: dict[str, str | None] = {
        "Steps": str(steps),
        "Sampler": sampler_name(cfg.get("sampler"), choices.get("sampler")),
        "Schedule type": schedule_name(cfg.get("discretization"), choices.get("discretization")),
        "CFG scale": None if scale is None else f"{float(scale):g}",
        "Seed": None,
        "Size": f"{W}x{H}",
        "Model hash": mhash,
        "Model": model,
        "Denoising strength": f"{strength:g}" if cfg.get("init_image") else None,
    }
    if cfg.get("refiner") is not None:
        rhash, rname = _model_fields(cfg.get("refiner_weights"), choices.get("refiner"))
        fields["Refiner"] = f"{rname} [{rhash}]" if rhash else rname
        fields["Refiner switch at"] = f"{float(cfg.refiner_switch):g}"
    if lora_files:
        names = (Path(f).stem.replace(":", "").replace(",", "") for f in lora_files)
        fields["Lora hashes"] = ", ".join(f"{n}: {lora_hash(f)}" for n, f in zip(names, lora_files))
    fields["Version"] = f"sgm {sgm.__version__}"
    return fields
