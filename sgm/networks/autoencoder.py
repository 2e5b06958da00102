"""First-stage models: the KL autoencoder of LDM/SDXL (``first_stage_model.*`` keys) and an identity.

``AutoencoderKL`` takes the original ``first_stage_config`` params (``embed_dim``,
``ddconfig``, ``lossconfig``...). Latents are unscaled: the engine applies ``scale_factor``.
With ``tiled=True`` (sizes in latent pixels) large images are encoded and decoded in tiles to
bound memory: ``tiled_mode="exact"`` (default) gives the untiled result (whole-image GroupNorm
statistics, exact halos: :mod:`sgm.networks.tiled`); ``"blend"`` decodes overlapping tiles
independently and blends them with linear ramps (each tile its own statistics: approximate).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributions import DiagonalGaussianDistribution
from .util import as_dict, check_int, ignore_params
from .tiled import tiled_decode, tiled_encode
from .vae import Decoder, Encoder

log = logging.getLogger(__name__)

__all__ = ["AutoencoderKL", "DiagonalGaussianDistribution", "IdentityFirstStage"]

TILED_MODES = ("exact", "blend")
_HARMLESS = ("image_key", "colorize_nlabels", "ema_decay", "learn_logvar", "input_key", "ckpt_engine",
             "regularizer_config", "trainable_ae_params", "ae_optimizer_args", "trainable_disc_params",
             "disc_optimizer_args", "disc_start_iter", "diff_boost_factor", "optimizer_config", "lr_g_factor")


def check_tiling(tile_size: Any, tile_overlap: Any, mode: Any, prefix: str = "") -> tuple[int, int, str]:
    """Tiling settings checked: ``tile_size`` >= 1, ``tile_overlap`` >= 0 (below the size in blend mode),
    ``tiled_mode`` exact or blend; errors name ``prefix`` + the parameter."""
    mode = str(mode)
    if mode not in TILED_MODES:
        raise ValueError(f"{prefix}tiled_mode must be one of {', '.join(TILED_MODES)}, got {mode!r}")
    size = check_int(f"{prefix}tile_size", tile_size)
    overlap = check_int(f"{prefix}tile_overlap", tile_overlap, minimum=0)
    if mode == "blend" and overlap >= size:
        raise ValueError(f"{prefix}tile_overlap ({overlap}) must be smaller than {prefix}tile_size ({size}) "
                         "in tiled_mode=blend")
    return size, overlap, mode


def check_tiling_config(node: Any, prefix: str) -> None:
    """The tiling keys of a first-stage config node (an AutoencoderKL's), checked before it is built."""
    if node is not None and hasattr(node, "get") and "tiled_mode" in node:
        check_tiling(node.get("tile_size", 64), node.get("tile_overlap", 16), node.get("tiled_mode"), prefix)


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering [0, n), the last one flush with the end."""
    if n <= tile:
        return [0]
    return [*range(0, n - tile, stride), n - tile]


def _ramp(length: int, ramp: int, left: bool, right: bool) -> torch.Tensor:
    """1-D blend weight: linear from ~0 to 1 over ``ramp`` pixels at each edge that has a neighbour."""
    w = torch.ones(length)
    if ramp > 0:
        up = (torch.arange(min(ramp, length), dtype=torch.float32) + 0.5) / ramp
        if left:
            w[: up.numel()] = torch.minimum(w[: up.numel()], up)
        if right:
            w[length - up.numel():] = torch.minimum(w[length - up.numel():], up.flip(0))
    return w


class AutoencoderKL(nn.Module):
    """KL-regularized autoencoder (sgm ``AutoencoderKL``): encoder, quant_conv, post_quant_conv, decoder.

    - ``encode_posterior(x)`` -> :class:`DiagonalGaussianDistribution` over latents;
    - ``encode(x, sample=None, generator=None)`` -> latent (a sample when ``sample`` or, by
      default, when a generator is given; else the posterior mode);
    - ``decode(z, tiled=None)`` -> image; tiles when ``tiled`` (argument, else the
      constructor's switch) and the latent is larger than ``tile_size``; encoding tiles
      likewise in ``tiled_mode="exact"``.

    Modules run in their parameter dtype; outputs come back in the input's dtype.
    """

    def __init__(
        self,
        embed_dim: int,
        ddconfig: dict[str, Any],
        lossconfig: dict[str, Any] | None = None,
        monitor: str | None = None,
        ckpt_path: str | None = None,
        ignore_keys: list[str] | tuple[str, ...] = (),
        tiled: bool = False,
        tile_size: int = 64,
        tile_overlap: int = 16,
        tiled_mode: str = "exact",
        **kwargs: Any,
    ):
        super().__init__()
        harmless = {k: kwargs.pop(k) for k in _HARMLESS if k in kwargs}
        ignore_params(type(self).__name__, harmless, kwargs)
        ddconfig = as_dict(ddconfig, "ddconfig")
        self._check_lossconfig(lossconfig)
        self.monitor = monitor
        self.embed_dim = check_int("embed_dim", embed_dim)
        z_channels = check_int("ddconfig.z_channels", ddconfig.get("z_channels"))
        double_z = bool(ddconfig.get("double_z", True))
        if not double_z:
            raise ValueError("ddconfig.double_z must be true for a KL autoencoder (mean and logvar)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, z_channels, 1)
        self.downsample_factor = 2 ** (self.decoder.num_resolutions - 1)
        self.set_tiling(tiled, tile_size, tile_overlap, tiled_mode)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    @staticmethod
    def _check_lossconfig(lossconfig: Any) -> None:
        if lossconfig is None or isinstance(lossconfig, nn.Identity):
            return
        if isinstance(lossconfig, nn.Module):
            log.warning("AutoencoderKL: loss module %s ignored (no autoencoder training losses here)",
                        type(lossconfig).__name__)
            return
        cfg = as_dict(lossconfig, "lossconfig")
        target = cfg.get("target", cfg.get("_target_"))
        if target != "torch.nn.Identity":
            log.warning("AutoencoderKL: lossconfig target %r ignored (no autoencoder training losses here)", target)

    def set_tiling(self, enabled: bool = True, tile_size: int | None = None, tile_overlap: int | None = None,
                   mode: str | None = None) -> None:
        """Switch tiling; sizes are in latent pixels (x ``downsample_factor`` in the image).

        ``mode``: ``exact`` (tiled encode and decode equal to the untiled ones; ``tile_overlap``
        unused, halos follow from the convolutions) or ``blend`` (decode only, overlapping tiles blended)."""
        size, overlap, mode = check_tiling(
            tile_size if tile_size is not None else getattr(self, "tile_size", 64),
            tile_overlap if tile_overlap is not None else getattr(self, "tile_overlap", 16),
            mode if mode is not None else getattr(self, "tiled_mode", "exact"))
        self.tiled, self.tile_size, self.tile_overlap, self.tiled_mode = bool(enabled), size, overlap, mode

    def init_from_ckpt(self, path: str | Path, ignore_keys: list[str] | tuple[str, ...] = ()) -> None:
        """Load weights from a full checkpoint (``first_stage_model.*``) or a bare VAE file."""
        path = str(path)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
        if any(k.startswith("first_stage_model.") for k in sd):
            sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
        sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in ignore_keys)}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        log.info("AutoencoderKL: restored from %s (%d missing, %d unexpected keys)", path, len(missing), len(unexpected))

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _uses_tiles(self, latent_hw: tuple[int, int], tiled: bool | None) -> bool:
        return (self.tiled if tiled is None else tiled) and max(latent_hw) > self.tile_size

    def encode_posterior(self, x: torch.Tensor, tiled: bool | None = None) -> DiagonalGaussianDistribution:
        """Posterior q(z | x) for images ``x`` [B, in_channels, H, W] in [-1, 1] (computed in the model dtype);
        in exact tiles when tiled (argument, else the switch) in exact mode and larger than a tile."""
        x = x.to(self.dtype)
        latent = (x.shape[-2] // self.downsample_factor, x.shape[-1] // self.downsample_factor)
        if self.tiled_mode == "exact" and self._uses_tiles(latent, tiled):
            moments = tiled_encode(self.encoder, x, self.tile_size, latent[0])
            return DiagonalGaussianDistribution(self.quant_conv(moments))
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def encode(
        self, x: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None,
        tiled: bool | None = None,
    ) -> torch.Tensor:
        """Unscaled latent of ``x``: a posterior sample or the posterior mean (its mode).

        ``sample=None`` (default) samples when a ``generator`` is given and returns the mode
        otherwise; ``True``/``False`` force either (``True`` without a generator uses the global RNG).
        ``tiled`` as in :meth:`encode_posterior`.
        """
        posterior = self.encode_posterior(x, tiled)
        sample = generator is not None if sample is None else sample
        z = posterior.sample(generator) if sample else posterior.mode()
        return z.to(x.dtype)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def decode(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Image from an unscaled latent ``z`` [B, embed_dim, h, w]; tiled per ``tiled`` or the switch."""
        zin = z.to(self.dtype)
        if self._uses_tiles(tuple(z.shape[-2:]), tiled):
            if self.tiled_mode == "exact":
                out = tiled_decode(self.decoder, self.post_quant_conv(zin), self.tile_size)
            else:
                out = self._tiled_decode(zin)
        else:
            out = self._decode(zin)
        return out.to(z.dtype)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode overlapping tiles and blend them with linear ramps (weights normalized to 1)."""
        f, size, overlap = self.downsample_factor, self.tile_size, self.tile_overlap
        h, w = z.shape[-2:]
        rows, cols = _tile_starts(h, size, size - overlap), _tile_starts(w, size, size - overlap)
        out = weight = None
        for y0 in rows:
            for x0 in cols:
                th, tw = min(size, h), min(size, w)
                tile = self._decode(z[..., y0:y0 + th, x0:x0 + tw]).float()
                wy = _ramp(th * f, overlap * f, y0 > 0, y0 + th < h)
                wx = _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w)
                mask = (wy[:, None] * wx[None, :]).to(tile.device)
                if out is None:
                    out = tile.new_zeros(*tile.shape[:2], h * f, w * f)
                    weight = tile.new_zeros(h * f, w * f)
                ys, xs = slice(y0 * f, (y0 + th) * f), slice(x0 * f, (x0 + tw) * f)
                out[..., ys, xs] += tile * mask
                weight[ys, xs] += mask
        return (out / weight).to(z.dtype)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruction and posterior (ldm's ``AutoencoderKL.forward``)."""
        posterior = self.encode_posterior(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z).to(x.dtype), posterior


class IdentityFirstStage(nn.Module):
    """First stage of a pixel-space model: encode and decode return their input."""

    downsample_factor = 1

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        if args or kwargs:
            log.debug("IdentityFirstStage: ignoring %s %s", args, sorted(kwargs))

    def encode(
        self, x: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
