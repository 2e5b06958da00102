"""AUTOMATIC1111 ``parameters`` text on our PNGs (sgm.tasks.a1111) and ``run.py from_image=IMG.png``."""

from __future__ import annotations

import hashlib
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from omegaconf import OmegaConf
from PIL.PngImagePlugin import PngInfo

import sgm
from sgm.tasks import a1111
from sgm.tasks.a1111 import format_parameters, parse_parameters

FIELDS = {"Steps": "30", "Sampler": "Euler", "Schedule type": "Karras", "CFG scale": "5", "Seed": "42",
          "Size": "32x32", "Model hash": "abcdef1234", "Model": "digits",
          "Lora hashes": "red_ink: 0123456789ab, b: 00ff00ff00ff", "Version": "sgm 0.1.0"}
FAST = ["progress=false", "~logger", "~metrics", "steps=3"]


def test_format_is_the_web_uis():
    text = format_parameters("a cat, sitting", "blurry", FIELDS)
    assert text == ("a cat, sitting\nNegative prompt: blurry\nSteps: 30, Sampler: Euler, Schedule type: Karras, "
                    "CFG scale: 5, Seed: 42, Size: 32x32, Model hash: abcdef1234, Model: digits, "
                    'Lora hashes: "red_ink: 0123456789ab, b: 00ff00ff00ff", Version: sgm 0.1.0')
    assert format_parameters("a cat", "", {"Steps": "3", "Seed": None, "Size": "8x8", "Model": "m"}) == \
        "a cat\nSteps: 3, Size: 8x8, Model: m"  # no negative line, None fields left out


@pytest.mark.parametrize("prompt, negative", [
    ("a cat, sitting: on a mat", "ugly, blurry"),
    ('a "quoted" word, and a backslash \\ here', 'no "text"'),
    ("line one\nline two, with: colon\n\nafter an empty line", "neg line 1\nneg: line 2"),
    ("Steps: 3, Sampler: x, Seed: 1", ""),  # a prompt that looks like a fields line
    ("ünïcödé 🐱, 日本語", ""),
])
def test_round_trip(prompt, negative):
    fields = dict(FIELDS, Model="name, with: colon", Extra='say "hi"\nbye')
    parsed = parse_parameters(format_parameters(prompt, negative, fields))
    assert (parsed.prompt, parsed.negative_prompt, parsed.fields) == (prompt, negative, fields)


def test_parses_a_web_ui_infotext():
    text = ("masterpiece, (best quality:1.2), a lighthouse\nNegative prompt: lowres, bad anatomy\n"
            "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3938432398, Size: 832x1216, "
            'Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Lora hashes: "detail: 8a6ffc2c7a3c", Version: v1.10.1')
    p = parse_parameters(text)
    assert p.prompt == "masterpiece, (best quality:1.2), a lighthouse" and p.negative_prompt == "lowres, bad anatomy"
    assert p.fields["Sampler"] == "DPM++ 2M" and p.fields["Size"] == "832x1216"
    assert p.fields["Lora hashes"] == "detail: 8a6ffc2c7a3c" and list(p.fields)[-1] == "Version"
    assert parse_parameters("just a prompt\nwith two lines").fields == {}


def test_hashes_are_the_web_uis(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"a": torch.arange(6.0)}, str(path), metadata={"ss_network_dim": "4"})
    blob = path.read_bytes()
    sha = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert a1111.model_hash(path) == sha[:10]
    header = int.from_bytes(blob[:8], "little")
    assert a1111.lora_hash(path) == hashlib.sha256(blob[8 + header:]).hexdigest()[:12] != sha[:12]
    hits = a1111._sha256.cache_info().hits
    a1111.model_hash(path)
    assert a1111._sha256.cache_info().hits == hits + 1  # hashed once per file version


def test_display_names():
    assert a1111.sampler_name({"_target_": "sgm.diffusion.samplers.EulerAncestralSampler"}) == "Euler a"
    assert a1111.sampler_name({"_target_": "sgm.diffusion.samplers.DPMPP2MSDESampler", "solver_type": "heun"}) == \
        "DPM++ 2M SDE Heun"
    assert a1111.sampler_name({"_target_": "sgm.diffusion.samplers.IPNDMSampler"}, "ipndm") == "ipndm"
    edm = {"_target_": "sgm.diffusion.discretization.EDMDiscretization"}
    assert a1111.schedule_name(dict(edm, rho=7.0)) == "Karras"
    assert a1111.schedule_name(dict(edm, rho=3.0), "edm") == "edm"
    assert a1111.schedule_name({"_target_": "sgm.diffusion.discretization.SGMUniformDiscretization"}) == "SGM Uniform"


def _chunk_types(path: Path) -> dict[str, bytes]:
    """PNG text chunk keyword -> chunk type, read from the file's bytes."""
    data, pos, out = path.read_bytes(), 8, {}
    while pos < len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind in (b"tEXt", b"iTXt"):
            out[body.split(b"\0", 1)[0].decode()] = kind
        assert zlib.crc32(kind + body) == int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big")
        pos += 12 + length
    return out


@pytest.fixture(scope="module")
def original(run_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("original")
    run_task("sample", [*FAST, 'prompt="a handwritten digit 3"', "num_images_per_prompt=2", "batch_size=2"], out)
    return out


def test_every_png_carries_its_parameters(original):
    pngs = sorted(original.glob("0*.png"))
    assert len(pngs) == 2
    ckpt = Path(sgm.__file__).parent / "assets" / "digits.safetensors"
    for k, png in enumerate(pngs):
        p = parse_parameters(Image.open(png).text["parameters"])
        assert p.prompt == "a handwritten digit 3" and p.negative_prompt == ""
        assert p.fields == {"Steps": "3", "Sampler": "Euler", "Schedule type": "edm", "CFG scale": "5",
                            "Seed": str(42 + k), "Size": "32x32",
                            "Model hash": hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10], "Model": "digits",
                            "Version": f"sgm {sgm.__version__}"}
        assert _chunk_types(png)["parameters"] == b"tEXt" and _chunk_types(png)["config"] == b"iTXt"


def test_from_image_reruns_one_image_bit_identically(run_task, original, tmp_path):
    out = tmp_path / "rerun"
    run_task("sample", ["progress=false", f"from_image={original / '00001.png'}"], out)
    assert [p.name for p in out.glob("0*.png")] == ["00001.png"]
    a, b = Image.open(original / "00001.png"), Image.open(out / "00001.png")
    assert OmegaConf.create(b.text["config"]).images == [1]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert b.text["seed"] == "43" and parse_parameters(b.text["parameters"]).fields["Seed"] == "43"
    assert str(original) not in b.text["config"]  # its outputs went to the new run folder only


def test_from_image_overrides_win(run_task, original, tmp_path):
    out = tmp_path / "rerun"
    run_task("sample", ["progress=false", f"from_image={original / '00000.png'}", "steps=2", "guider.scale=1.5"], out)
    new = Image.open(out / "00000.png")
    cfg = OmegaConf.create(new.text["config"])
    assert cfg.steps == 2 and cfg.sampler.guider.scale == 1.5  # the sampler's guider follows ${guider} again
    assert parse_parameters(new.text["parameters"]).fields["CFG scale"] == "1.5"
    assert not np.array_equal(np.asarray(new), np.asarray(Image.open(original / "00000.png")))
    with pytest.raises(ValueError, match="changes what the image is"):
        run_task("sample", ["progress=false", f"from_image={original / '00000.png'}", "model=tiny"], tmp_path / "x")


def test_from_image_refuses_what_it_cannot_rerun(run_task, tmp_path):
    foreign = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", format_parameters("a cat", "", dict(FIELDS, Sampler="DPM++ 2M")))
    Image.new("RGB", (8, 8)).save(foreign, pnginfo=info)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    hint = r"""python run.py 'prompt="a cat"' seed=42 steps=30 guider.scale=5 W=32 H=32"""
    cases = [(foreign, r"AUTOMATIC1111.*DPM\+\+ 2M.*" + hint),
             (plain, "no sgm metadata"), (tmp_path / "missing.png", "does not exist")]
    for path, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run_task("sample", ["progress=false", f"from_image={path}"], tmp_path / path.stem)
        assert not (tmp_path / path.stem / "00000.png").exists()
