"""The scripts behind the shipped model and the LoRA experiment, on tiny budgets (in-process)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sgm.config import instantiate

from conftest import preserved_globals

ROOT = Path(__file__).resolve().parents[1]


def _script(path: Path) -> ModuleType:
    """An experiment script as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ten training steps, then the latent statistics
def test_autoencoder_trainer_writes_weights_for_the_tiny_first_stage(tmp_path, monkeypatch):
    out = tmp_path / "ae.safetensors"
    script = ROOT / "experiments/shipped_model/train_autoencoder.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "10", "--batch-size", "4", "--threads", "1",
                                      "--stats-images", "200", "--eval-images", "50", "--out", str(out)])
    with preserved_globals():  # in-process: the script seeds torch and sets its threads
        _script(script).main()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert float(meta["scale_factor"]) > 0 and meta["steps"] == "10" and meta["seed"] == "0"
    assert meta["stats_images"] == "200" and meta["eval_images"] == "50"
    vae = instantiate(OmegaConf.load(ROOT / "conf/first_stage/tiny.yaml"))
    vae.load_state_dict(load_file(str(out)))  # strict: exactly the AutoencoderKL's keys


def test_red_ink_data_puts_the_style_behind_the_trigger(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from red_ink_lora import TRIGGER, write_data
    finally:
        sys.path.pop(0)
    write_data(tmp_path, n_style=20, n_regularization=20, seed=0)
    captions = {p.stem: p.read_text() for p in tmp_path.glob("*.txt")}
    assert len(captions) == 40 and len(list(tmp_path.glob("*.png"))) == 40
    styled = [k for k, c in captions.items() if c.endswith(TRIGGER)]
    assert len(styled) == 20
    for key, text in captions.items():
        rgb = np.asarray(Image.open(tmp_path / f"{key}.png")).reshape(-1, 3).astype(float)
        ink = rgb[rgb.max(1) > 128].mean(0)
        red = ink[0] > 2 * ink[1:].max()
        assert red == (key in styled), (text, ink)
        assert text.startswith("a handwritten digit ")
