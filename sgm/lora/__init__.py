"""LoRA for SDXL-family engines: train adapters, write kohya files, merge LoRA files for sampling.

Training::

    names = inject_lora(engine, LoRASpec(rank=16, alpha=16))   # engine frozen, adapters trainable
    ...                                                         # Trainer.fit(engine)
    save_lora(engine, "out.safetensors")                        # kohya file (FORMATS.md)
    merge_trained_lora(engine) / remove_lora(engine)            # bake in / take off the adapters

Sampling::

    handle = load_lora_files(engine, ["a.safetensors", "b.safetensors"], [0.8, 0.5])
    ...                                                         # sample with merged weights
    handle.unmerge()                                            # original weights back

Module layout: :mod:`.spec` (LoRASpec, default targets), :mod:`.names` (adaptable layers,
kohya and diffusers names), :mod:`.delta` (the update ``alpha / r * up @ down`` and its
merge into a weight), :mod:`.layers` (adapters and hooks), :mod:`.files` (file I/O,
format conversion, merging). Own layers rather than PEFT: bigG's q/k/v are row thirds of
one ``nn.MultiheadAttention.in_proj_weight`` (PEFT adapts modules, not row blocks), the
engine's state-dict keys must stay those of the original checkpoints, and the file
format is kohya's with sgm names either way.
"""

from .files import (
    LoRAFileError,
    LoRAMerge,
    LoRAWeights,
    guess_kind,
    load_lora_files,
    lora_metadata,
    lora_state_dict,
    read_lora_file,
    resolve_lora,
    save_lora,
    unmerge_lora,
)
from .layers import LoRAAdapter, LoRANetwork, inject_lora, lora_network, merge_trained_lora, remove_lora
from .names import Target, all_targets, kohya_name, select_targets, text_encoders, unet_diffusers_paths
from .spec import DEFAULT_TE_TARGETS, DEFAULT_UNET_TARGETS, UNET_CONV_TARGETS, LoRASpec

__all__ = [
    "DEFAULT_TE_TARGETS", "DEFAULT_UNET_TARGETS", "UNET_CONV_TARGETS", "LoRAAdapter", "LoRAFileError", "LoRAMerge",
    "LoRANetwork", "LoRASpec", "LoRAWeights", "Target", "all_targets", "guess_kind", "inject_lora", "kohya_name",
    "load_lora_files", "lora_metadata", "lora_network", "lora_state_dict", "merge_trained_lora", "read_lora_file",
    "remove_lora", "resolve_lora", "save_lora", "select_targets", "text_encoders", "unet_diffusers_paths",
    "unmerge_lora",
]
