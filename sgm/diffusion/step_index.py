"""Where a run enters its schedule and where the refiner takes over: indices into the ``steps + 1``
sigmas of :func:`sgm.diffusion.schedule.sampling_sigmas`, computed without torch (run.py checks
them before torch is imported)."""

from __future__ import annotations

IMG2IMG_RULES = ("last_steps", "sgm")


def img2img_start(num_steps: int, strength: float, rule: str = "last_steps") -> int:
    """Index into an ``num_steps``-step schedule (``num_steps + 1`` sigmas) where img2img starts.

    * ``last_steps`` (default): the last ``max(1, round(strength * num_steps))`` steps run.
    * ``sgm`` (Stability's ``Img2ImgDiscretizationWrapper``): the last
      ``max(1, int(strength * (num_steps + 1)))`` sigmas, the final 0 included, are kept, so
      one step fewer runs (strength 0.6, 10 steps: 5 steps against 6); it may keep no step at
      all, and the run then returns the init image's latent.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if rule not in IMG2IMG_RULES:
        raise ValueError(f"img2img_schedule must be one of {IMG2IMG_RULES}, got {rule!r}")
    if strength == 1.0:
        return 0
    if rule == "sgm":
        return num_steps + 1 - max(1, int(strength * (num_steps + 1)))
    return num_steps - max(1, round(strength * num_steps))


def split_index(num_steps: int, switch: float) -> int:
    """Index where the base model hands over to the refiner: step ``round(switch * num_steps)``."""
    if not 0.0 < switch < 1.0:
        raise ValueError(f"refiner_switch must be in (0, 1), got {switch}")
    return round(switch * num_steps)
