"""CLIP score (Hessel et al. 2021, "CLIPScore"): how well each image matches its prompt.

Per image 100 * max(cos(E_image, E_prompt), 0) with an open_clip model, averaged over the run
(the scale torchmetrics' ``CLIPScore`` uses; the paper's w = 2.5 is a rescaling of it). The
model comes from a local checkpoint only (``open_clip.create_model_and_transforms(arch,
pretrained=PATH)``, ``torch.load(weights_only=True)`` or safetensors); the tokenizer is open_clip's
bundled BPE, so nothing is downloaded. Images are preprocessed by the model's own eval transform.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from ..tasks.writer import to_uint8
from ..conditioning.open_clip import import_open_clip
from .features import pick_device

log = logging.getLogger(__name__)


def _arch_name(arch: str, what: str) -> str:
    """A bundled open_clip arch name, or the name a model-config JSON file registers (its stem)."""
    open_clip = import_open_clip()

    path = Path(arch).expanduser()
    if arch.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"{what} {arch!r}: no such model-config file")
        json.loads(path.read_text())  # a broken file fails here, naming it
        open_clip.add_model_config(path)
        arch = path.stem
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"{what}={arch!r} is not an open_clip architecture (open_clip.list_models()) nor a "
                         "model-config .json file")
    text = cfg.get("text_cfg") or {}
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise ValueError(f"{what}={arch!r} uses a Hugging Face text tower or tokenizer, which would be downloaded: "
                         "choose an arch with open_clip's own text transformer (e.g. ViT-L-14)")
    return arch


class ClipScore:
    """``clip_score`` (mean over images) and ``clip_score_images`` with the open_clip ``arch`` and
    its weights ``checkpoint``; ``quick_gelu`` for OpenAI's original weights."""

    needs_prompts = True

    def __init__(self, checkpoint: str | None, arch: str = "ViT-L-14", quick_gelu: bool = False,
                 batch_size: int = 32, device: str | None = None, key: str = "clip_score"):
        open_clip = import_open_clip()

        self.key, self.batch_size = key, int(batch_size)
        what = f"metrics.{key}.checkpoint"
        if not checkpoint:
            raise ValueError(f"{what} is not set: give the open_clip weights of metrics.{key}.arch "
                             "(.safetensors, .bin or .pt state dict; nothing is downloaded)")
        path = Path(str(checkpoint)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} {str(path)!r} {'is a directory' if path.is_dir() else 'does not exist'}:"
                                    " give the open_clip weights file")
        self.arch = _arch_name(str(arch), f"metrics.{key}.arch")
        self.device = pick_device(device)
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                self.arch, pretrained=str(path), force_quick_gelu=bool(quick_gelu), weights_only=True,
                pretrained_text=False)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"{what} {str(path)!r} does not hold open_clip weights of {self.arch}: "
                             f"{str(exc).splitlines()[0]}") from None
        self.model = model.eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(self.arch)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per image 100 * max(cos, 0) ([N]); ``images`` [N, C, H, W] in [-1, 1]."""
        out = []
        pixels = to_uint8(images.detach().cpu())
        for i in range(0, len(pixels), self.batch_size):
            batch = torch.stack([self.preprocess(Image.fromarray(p)) for p in pixels[i:i + self.batch_size]])
            img = self.model.encode_image(batch.to(self.device), normalize=True)
            txt = self.model.encode_text(self.tokenizer(prompts[i:i + self.batch_size]).to(self.device),
                                         normalize=True)
            out.append((100 * (img * txt).sum(-1).clamp(min=0)).double().cpu())
        return torch.cat(out)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        missing = sum(not p.strip() for p in prompts)
        if len(prompts) != len(images) or missing:
            raise ValueError(f"{self.key} needs a prompt for every image: {missing or abs(len(images) - len(prompts))}"
                             f" of {len(images)} images have none")
        return {self.key: float(self.scores(images, prompts).mean()), f"{self.key}_images": len(images)}
