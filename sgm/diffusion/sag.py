"""Self-attention guidance, SAG (Hong et al. 2023, "Improving Sample Quality of Diffusion Models
Using Self-Attention Guidance", sec. 4 and eq. 25).

At each step the guided branch (the unconditional one with CFG, as in the paper's eq. 25 and
diffusers' ``StableDiffusionSAGPipeline``; the conditional one without) is evaluated with the
self-attention of one layer (default: the middle block's first) captured
(:class:`sgm.networks.patches.SelfAttentionCapture`, carried in the branch's options). Its
attention mask is where a token receives more attention than ``threshold`` (the column sums of
the head-averaged map; 1 is the average), upsampled (nearest) to the latent size. The branch's
x0 prediction x0_b is blurred (Gaussian, ``blur_kernel`` taps, std ``blur_sigma``, reflect
padding) where the mask is on, giving x0_blur, re-noised with the branch's own noise
prediction, x_deg = x0_blur + (x - x0_b), and evaluated once more at the same sigma:

    eps = eps_cfg + sag_scale * (eps_b(x) - eps_b(x_deg))           (paper, diffusers)
    x0  = x0_cfg + sag_scale * (x0_blur - x0_b(x_deg))              (the same, in x0)

since sigma * (eps_b(x) - eps_b(x_deg)) = x0_b(x_deg) - x0_blur. A SAG step costs one network
evaluation more than CFG: the captured branches run as one call (the capture sits on both CFG
branches, so they stay batched), then the degraded one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..networks.patches import SelfAttentionCapture
from ._checks import check_finite, check_int, check_positive
from .guiders import Branch, Guided, VanillaCFG, evaluate_branches


def gaussian_blur(x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Blur ``x`` [B, C, H, W] with a normalized Gaussian of ``kernel_size`` taps and std ``sigma``
    (separable, reflect padding, each channel on its own)."""
    half = (kernel_size - 1) / 2
    if min(x.shape[-2:]) <= kernel_size // 2:
        raise ValueError(f"blur_kernel {kernel_size} needs a latent larger than {kernel_size // 2} pixels "
                         f"on each side for reflect padding, got {tuple(x.shape[-2:])}")
    taps = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = (weights / weights.sum()).to(device=x.device, dtype=x.dtype)
    channels = x.shape[1]
    pad = kernel_size // 2
    out = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, weights.reshape(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(out, weights.reshape(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of ``tokens`` attention tokens of a ``height`` x ``width`` latent: the latent
    size halved (rounding up, as stride-2 convolutions do; or down, as pooling does) until it fits."""
    for halve in (lambda n: -(-n // 2), lambda n: n // 2):
        h, w = height, width
        while h * w > tokens:
            h, w = halve(h), halve(w)
        if h * w == tokens:
            return h, w
    raise ValueError(f"cannot place {tokens} attention tokens on a halving of the {height}x{width} latent")


class SAGGuider(VanillaCFG):
    """Self-attention guidance on top of :class:`~sgm.diffusion.guiders.VanillaCFG` (Hong et al. 2023).

    ``scale``: CFG (1: none, the conditional branch is the guided one); ``sag_scale`` s (0: plain
    CFG, no capture, no extra call; the paper's and diffusers' default 0.75); ``threshold`` of
    the attention mask (1.0); ``blur_sigma`` (1.0) and ``blur_kernel`` (9); ``layer``: the
    self-attention layer whose map is read; ``branch``: ``"uncond"`` (eq. 25) or ``"cond"``, the
    branch SAG degrades when CFG runs. ``dyn_thresh`` applies to the CFG part; ``rescale``, as for
    PAG, to the whole guided x0 and only with CFG; outside ``sigma_interval`` the step is the
    conditional prediction alone (no SAG either).
    """

    def __init__(
        self,
        scale: float = 5.0,
        sag_scale: float = 0.75,
        threshold: float = 1.0,
        blur_sigma: float = 1.0,
        blur_kernel: int = 9,
        layer: str = "middle_block.1.transformer_blocks.0.attn1",
        branch: str = "uncond",
        dyn_thresh: Any = None,
        rescale: float = 0.0,
        sigma_interval: tuple[float, float] | None = None,
        *,
        dyn_thresh_config: Any = None,
    ):
        super().__init__(scale, dyn_thresh, rescale, sigma_interval, dyn_thresh_config=dyn_thresh_config)
        self.sag_scale = check_finite("sag_scale", sag_scale)
        self.threshold = check_finite("threshold", threshold)
        self.blur_sigma = check_positive("blur_sigma", blur_sigma)
        self.blur_kernel = check_int("blur_kernel", blur_kernel)
        if self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {blur_kernel!r}")
        if branch not in ("uncond", "cond"):
            raise ValueError(f"branch must be 'uncond' or 'cond', got {branch!r}")
        self.branch = branch
        self.capture = SelfAttentionCapture(layer)
        self.options = {"patches": [self.capture]}  # one object: the captured branches share a call

    def guide(self, denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uc: dict | None) -> Guided:
        if not self.is_active(sigma) or not self.sag_scale:
            return super().guide(denoise, x, sigma, cond, uc)
        cfg = uc is not None and self.scale != 1
        names = ["uncond", "cond"] if cfg else ["cond"]
        conds = {"uncond": uc, "cond": cond}
        predictions = evaluate_branches(denoise, x, sigma, [Branch(n, conds[n], self.options) for n in names])
        guided = self.branch if cfg else "cond"
        rows = names.index(guided) * x.shape[0]  # evaluate_branches stacks a call's branches in order
        maps = self.capture.maps
        if maps is None:
            raise RuntimeError(f"SAG: the network never ran the captured layer {self.capture.layer!r}")
        x0_b = predictions[guided]
        blurred = self.degrade(x0_b, maps[rows : rows + x.shape[0]])
        predictions["degraded"] = denoise(blurred + (x - x0_b), sigma, conds[guided])
        x_c = predictions["cond"]
        out = self.dyn_thresh(predictions["uncond"], x_c, self.scale) if cfg else x_c
        out = out + self.sag_scale * (blurred - predictions["degraded"])
        return Guided(self.rescaled(out, x_c) if cfg else out, predictions)

    def degrade(self, x0: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``x0`` blurred where the attention ``maps`` [B, N, N] (head-averaged) mark salient tokens."""
        b, _, height, width = x0.shape
        h, w = token_grid(maps.shape[-1], height, width)
        mask = (maps.sum(dim=1) > self.threshold).to(x0.dtype).reshape(b, 1, h, w)
        mask = F.interpolate(mask, size=(height, width), mode="nearest")
        return torch.lerp(x0, gaussian_blur(x0, self.blur_kernel, self.blur_sigma), mask)

    # the original sgm API has one network call per step: not enough for SAG
    def prepare_inputs(self, *args: Any) -> tuple:
        raise TypeError("SAGGuider evaluates a degraded branch after the guided ones: call "
                        "guider.guide(denoise, x, sigma, cond, uc), as the samplers do")

    __call__ = prepare_inputs

    def __repr__(self) -> str:
        return (f"SAGGuider(scale={self.scale}, sag_scale={self.sag_scale}, threshold={self.threshold}, "
                f"blur_sigma={self.blur_sigma}, blur_kernel={self.blur_kernel}, layer={self.capture.layer!r}, "
                f"branch={self.branch!r}, rescale={self.rescale}, sigma_interval={self.sigma_interval})")
