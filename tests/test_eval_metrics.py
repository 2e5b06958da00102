"""sgm.metrics for any model: FID, KID, precision/recall (tiny feature network; the Inception
loader on a random-init torch-fidelity state dict), CLIP score (tiny open_clip model), MetricSet
and the conf/metrics files. Oracles: scipy's sqrtm FID formula, the MMD^2 sum, brute-force k-NN
manifolds and torch-fidelity's precision/recall, open_clip's encoders with the formula."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from torch import nn

from sgm.metrics import MetricSet
from sgm.metrics.distribution import FrechetDistance, KernelDistance
from sgm.metrics.features import InceptionFeatures, ModuleFeatures
from sgm.metrics.precision_recall import PrecisionRecall, precision_recall
from sgm.metrics.resize import clean_resize
from sgm.metrics.stats import FeatureStats, write_folder_stats


class TinyNet(nn.Module):
    """A 6-d feature network on 16 x 16 images (features of order 1); counts its calls."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(16, 6)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 100 * self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def uint8_images(n: int, seed: int, shift: float = 0.0, size: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(127 + shift, 40, size=(n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 30, size=(n, size, size, 3)), 0, 255).round().astype(np.uint8)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def write_folder(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:03d}.png" for i in range(len(images))]
    for p, im in zip(paths, images):
        Image.fromarray(im).save(p)
    return paths


@pytest.fixture(scope="module")
def space():
    return ModuleFeatures(TinyNet(), name="tiny-0", size=16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("ref"), uint8_images(40, seed=1))


@pytest.fixture(scope="module")
def fake():
    return as_tensor(uint8_images(40, seed=2, shift=60))


def fid_formula(real: np.ndarray, fake: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


# -- resize ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 64])
def test_clean_resize_is_antialiased_bicubic_in_float_without_quantisation(size):
    im = np.random.default_rng(3).integers(0, 256, (37, 29, 3)).astype(np.uint8)
    out = clean_resize(im, size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    # torch's antialiased bicubic (a = -0.5, PIL's support scaling) in float64: the same filter
    want = nn.functional.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].double(), size=(size, size),
                                     mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 255)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4)
    assert (out - out.round()).abs().max() > 0.05  # not quantised
    quantised = np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(out.numpy() - quantised).max() > 0.5  # PIL's 8-bit path rounds between its two passes
    assert torch.equal(clean_resize(np.full((9, 7, 3), 200, np.uint8), 16), torch.full((3, 16, 16), 200.0))


# -- FID / KID / precision-recall ------------------------------------------------------------------
def test_fid_is_the_frechet_formula_on_the_features(space, reference, fake):
    out = FrechetDistance(str(reference[0].parent), space)(fake, [""] * len(fake))
    want = fid_formula(space.extract_files(reference).numpy(), space.extract(fake).numpy())
    assert out["fid"] == pytest.approx(want, rel=1e-7) and want > 1
    assert out["fid_images"] == 40 and out["fid_reference_images"] == 40
    assert FrechetDistance(str(reference[0].parent), space)(fake[:1], [""])  == {}  # fewer than min_images


def test_kid_is_the_unbiased_mmd_and_seeded(space, reference, fake):
    ref = str(reference[0].parent)
    out = KernelDistance(ref, space, subsets=1)(fake, [""] * 40)  # one subset of all 40: the full sets
    real = space.extract_files(reference).float().double()  # reference features are kept in float32
    want = mmd2_unbiased(real.numpy(), space.extract(fake).numpy())
    assert out["kid"] == pytest.approx(want, rel=1e-9) and out["kid_subset_size"] == 40 and out["kid_images"] == 40
    a, b = (KernelDistance(ref, space, subsets=5, subset_size=10, seed=s)(fake, [""] * 40) for s in (0, 0))
    c = KernelDistance(ref, space, subsets=5, subset_size=10, seed=1)(fake, [""] * 40)
    assert a == b and a["kid"] != c["kid"] and a["kid_std"] > 0


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return [sorted(np.linalg.norm(x - xi, axis=1))[k] for xi in x]  # [0] is the sample itself

    def share(query, support, r):
        return np.mean([any(np.linalg.norm(q - s) <= rs for s, rs in zip(support, r)) for q in query])

    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def test_precision_recall_against_brute_force_and_torch_fidelity(space, reference, fake):
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(0)
    real, gen = torch.randn(60, 5, generator=g), torch.randn(50, 5, generator=g) * 1.5 + 0.5
    ours = precision_recall(real, gen, k=3)
    assert ours == pytest.approx(brute_force_pr(real.numpy(), gen.numpy(), 3), abs=1e-12)
    assert ours == pytest.approx(calculate_precision_recall_full(gen, real, neighborhood=3), abs=1e-6)
    assert 0.2 < ours[0] < 0.95 and 0.2 < ours[1] <= 1
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    out = PrecisionRecall(str(reference[0].parent), space)(fake, [""] * 40)
    assert (out["precision"], out["recall"]) == precision_recall(space.extract_files(reference).float(),
                                                                 space.extract(fake))
    assert out["precision_recall_images"] == 40 and out["precision_recall_k"] == 3


def test_stats_file_stands_for_the_folder_and_names_its_feature_space(space, reference, fake, tmp_path):
    folder = reference[0].parent
    stats_file = tmp_path / "ref.safetensors"
    write_folder_stats(folder, stats_file, space, max_features=100)
    for metric in (FrechetDistance, KernelDistance, PrecisionRecall):
        by_file = metric(str(stats_file), space)(fake, [""] * 40)
        by_folder = metric(str(folder), space)(fake, [""] * 40)
        assert by_file.keys() == by_folder.keys()
        assert all(by_file[k] == pytest.approx(by_folder[k], rel=1e-9) for k in by_file), (by_file, by_folder)
    loaded = FeatureStats.load(stats_file)
    assert loaded.identity == space.identity == "module[tiny-0]/resize=clean@16" and loaded.count == 40
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_folder_stats(folder, stats_file, space)
    other = ModuleFeatures(TinyNet(seed=1), name="tiny-1", size=16)
    with pytest.raises(ValueError, match=r"statistics of module\[tiny-0\].*not of this metric's module\[tiny-1\]"):
        FrechetDistance(str(stats_file), other)
    resized = ModuleFeatures(TinyNet(), name="tiny-0", size=16, resize="tf_bilinear")
    with pytest.raises(ValueError, match="only comparable in one feature space"):
        FrechetDistance(str(stats_file), resized)
    # a kept sample: mean and covariance stay those of all images
    fid_only = tmp_path / "fid_only.safetensors"
    write_folder_stats(folder, fid_only, space, max_features=0)
    assert FrechetDistance(str(fid_only), space)(fake, [""] * 40)["fid"] == pytest.approx(
        FrechetDistance(str(folder), space)(fake, [""] * 40)["fid"], rel=1e-9)
    with pytest.raises(ValueError, match="metrics.kid.reference .* keeps no feature sample"):
        KernelDistance(str(fid_only), space)
    sub = FeatureStats.of(space.extract_files(reference), "x", max_features=10, seed=3)
    assert len(sub.features) == 10 and sub.count == 40


def test_reference_errors_name_the_parameter_and_file(space, reference, tmp_path):
    with pytest.raises(ValueError, match="metrics.fid.reference is not set"):
        FrechetDistance(None, space)
    with pytest.raises(FileNotFoundError, match="metrics.kid.reference .*does not exist"):
        KernelDistance(str(tmp_path / "nowhere"), space)
    bad = tmp_path / "bad"
    write_folder(bad, uint8_images(3, seed=4))
    (bad / "001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"metrics.fid.reference: .*001.png is not a readable image"):
        FrechetDistance(str(bad), space)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors' is not a readable safetensors statistics file"):
        FrechetDistance(str(junk), space)
    with pytest.raises(ValueError, match="min_images must be at least 2"):
        FrechetDistance(str(reference[0].parent), space, min_images=1)
    with pytest.raises(TypeError, match="metrics.fid.features must be a feature space"):
        FrechetDistance(str(reference[0].parent), TinyNet())


def test_metric_set_merges_embeds_once_and_refuses_duplicate_keys(reference, fake):
    net = TinyNet()
    space = ModuleFeatures(net, name="tiny-count", size=16, batch_size=64)
    ref = str(reference[0].parent)
    metrics = MetricSet(features=space, fid=FrechetDistance(ref, space), kid=KernelDistance(ref, space),
                        precision_recall=PrecisionRecall(ref, space))
    calls = net.calls
    out = metrics(fake, [""] * 40)
    assert {"fid", "fid_images", "kid", "kid_std", "kid_images", "precision", "recall",
            "precision_recall_images"} <= set(out)
    assert net.calls - calls == 2  # the run's 40 images once (one batch), the reference folder once
    with pytest.raises(ValueError, match="metrics.b and metrics.a both report 'fid'"):
        MetricSet(a=FrechetDistance(ref, space), b=FrechetDistance(ref, space))(fake, [""] * 40)
    with pytest.raises(TypeError, match="metrics.x is not a metric"):
        MetricSet(x=3)


def test_a_custom_feature_network_takes_its_weights_from_a_local_file(tmp_path, fake):
    from safetensors.torch import save_file

    trained = TinyNet(seed=5)
    path = tmp_path / "tiny.safetensors"
    save_file(trained.state_dict(), str(path))
    space = ModuleFeatures(TinyNet(seed=0), size=16, weights=str(path))
    assert space.identity.startswith("module[sha256:") and space.dim == 6
    want = ModuleFeatures(trained, size=16, name="trained").extract(fake)
    torch.testing.assert_close(space.extract(fake), want)
    save_file({"fc.weight": torch.zeros(6, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)metrics.features.weights: .*fc.weight: model \[6, 16\], file \[6, 3\]"
                                         r".*must be the state dict of TinyNet"):
        ModuleFeatures(TinyNet(), size=16, weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="metrics.features.name is not set"):
        ModuleFeatures(TinyNet(), size=16)


# -- the config files ------------------------------------------------------------------------------
def test_metrics_files_compose_into_one_set(compose, tmp_path, monkeypatch):
    cfg = compose("sample", ["metrics=[digits,fid,kid,precision_recall,clip_score]"])
    node = cfg.metrics
    assert node._target_ == "sgm.metrics.MetricSet"
    assert {"digits", "fid", "kid", "precision_recall", "clip_score", "features"} <= set(node)
    assert node.fid.features == node.kid.features == node.features  # one feature space, set once
    assert node.features._target_ == "sgm.metrics.features.InceptionFeatures"
    # built in validate: the missing Inception file is named before any model weight is read
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub
    cfg = compose("sample", ["metrics=[fid]", f"metrics.fid.reference={tmp_path}"])
    with pytest.raises(InstantiationException, match="metrics.features.weights is not set.*nothing is downloaded"):
        instantiate(cfg.metrics)


def test_default_metrics_keep_the_digit_keys(compose):
    from sgm.metrics.digits import held_out_digits

    judge = instantiate(compose("sample").metrics)
    assert isinstance(judge, MetricSet) and list(judge.metrics) == ["digits"]
    images, labels = held_out_digits()
    out = judge(images[:20].expand(-1, 3, -1, -1), [f"a handwritten digit {int(d)}" for d in labels[:20]])
    assert set(out) == {"labelled_images", "accuracy", "frechet_distance"} and out["accuracy"] >= 0.9


# -- Inception ---------------------------------------------------------------------------------------
def test_inception_weights_errors_are_named(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="metrics.features.weights is not set .*weights-inception-2015-12-05"):
        InceptionFeatures()
    with pytest.raises(FileNotFoundError, match="metrics.features.weights .*missing.pth' is missing"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"metrics.features.weights: .*junk.pth could not be read with torch.load"):
        InceptionFeatures(str(junk))
    partial = tmp_path / "partial.safetensors"
    save_file({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 2, 2)}, str(partial))
    with pytest.raises(ValueError, match=r"(?s)metrics.features.weights: .*missing key.*Conv2d_1a_3x3.conv.weight: "
                                         r"model \[32, 3, 3, 3\], file \[32, 3, 2, 2\].*torch-fidelity uses"):
        InceptionFeatures(str(partial))


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception v3 with its random init, saved as a state dict (95 MB, tmp only)."""
    from sgm.metrics.features import _inception_class

    torch.manual_seed(0)
    net = _inception_class()()
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow  # a 95 MB random Inception and four 299 x 299 forward passes
@pytest.mark.parametrize("resize, size", [("clean", 299), ("tf_bilinear", 64)])
def test_inception_features_are_torch_fidelitys(random_inception, resize, size, caplog):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = InceptionFeatures(str(random_inception), resize=resize, device="cpu")
    assert "is not the published Inception file" in caplog.text
    assert ours.identity.startswith("inception_v3_2048[sha256:") and ours.identity.endswith(f"resize={resize}@299")
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(random_inception))
    images = uint8_images(2, seed=5, size=size)
    want = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0]
    got = ours.extract(as_tensor(images))
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    assert got.shape == (2, 2048) and got.std() > 0


def test_stats_command_refuses_to_overwrite_and_names_missing_weights(reference, tmp_path, monkeypatch, caplog):
    from sgm.metrics.stats import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    folder = str(reference[0].parent)
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    assert main([folder, "--out", str(taken)]) == 1 and taken.read_bytes() == b"keep me"
    assert "refusing to overwrite" in caplog.text
    assert main([folder, "--out", str(tmp_path / "new.safetensors")]) == 1
    assert "--weights is not set" in caplog.text and not (tmp_path / "new.safetensors").exists()


@pytest.mark.slow  # the random Inception on six 40 x 40 images
def test_stats_command_writes_inception_statistics(random_inception, reference, tmp_path):
    from sgm.metrics.stats import main

    out = tmp_path / "stats.safetensors"
    folder = tmp_path / "imgs"
    write_folder(folder, uint8_images(6, seed=7, size=40))
    assert main([str(folder), "--out", str(out), "--weights", str(random_inception), "--device", "cpu"]) == 0
    space = InceptionFeatures(str(random_inception), device="cpu")
    stats = FeatureStats.load(out)
    assert stats.identity == space.identity and stats.count == 6 and stats.features.shape == (6, 2048)
    images = as_tensor(np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]))
    torch.testing.assert_close(stats.features.double(), space.extract(images).float().double())
    assert FrechetDistance(str(out), space)(images, [""] * 6)["fid"] == pytest.approx(0, abs=1e-3)


# -- CLIP score ----------------------------------------------------------------------------------------
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(model-config JSON path, weights path, the model): a tiny random open_clip CLIP saved locally."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    arch = folder / "tiny-clip-test.json"
    arch.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    weights = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    return arch, weights, model


def test_clip_score_is_hessels_formula_on_open_clip(tiny_clip):
    import open_clip
    from sgm.metrics.clip_score import ClipScore

    arch, weights, model = tiny_clip
    metric = ClipScore(str(weights), arch=str(arch), quick_gelu=False, device="cpu", batch_size=3)
    images = uint8_images(5, seed=6, size=48)
    prompts = ["a red cube", "a dog", "a blue sphere on a table", "two cats", "a lighthouse at dawn"]
    out = metric(as_tensor(images), prompts)
    # by hand: shortest side to 32 (bicubic), centre crop, CLIP normalisation, cosine of the embeddings
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    pixels = torch.stack([torch.from_numpy(np.array(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC))
                                           ).permute(2, 0, 1).float() / 255 for im in images])
    with torch.no_grad():
        img = model.encode_image((pixels - mean[:, None, None]) / std[:, None, None])
        txt = model.encode_text(open_clip.tokenize(prompts))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    want = (100 * cos.clamp(min=0)).mean().item()
    assert out["clip_score"] == pytest.approx(want, rel=1e-4, abs=1e-4) and out["clip_score_images"] == 5
    assert (cos > 0).any()
    with pytest.raises(ValueError, match="clip_score needs a prompt for every image: 1 of 5"):
        metric(as_tensor(images), prompts[:4] + [""])


def test_clip_score_errors_are_named(tiny_clip, tmp_path):
    import open_clip
    from sgm.metrics.clip_score import ClipScore

    arch, weights, _ = tiny_clip
    with pytest.raises(ValueError, match="metrics.clip_score.checkpoint is not set"):
        ClipScore(None)
    with pytest.raises(FileNotFoundError, match="metrics.clip_score.checkpoint .*does not exist"):
        ClipScore(str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="metrics.clip_score.arch='roberta-ViT-B-32' uses a Hugging Face text tower"):
        ClipScore(str(weights), arch="roberta-ViT-B-32")
    with pytest.raises(ValueError, match="metrics.clip_score.arch='no-such-arch' is not an open_clip architecture"):
        ClipScore(str(weights), arch="no-such-arch")
    other = {**TINY_CLIP, "embed_dim": 8}
    wrong = tmp_path / "wrong.pt"
    torch.save(open_clip.CLIP(**other).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"metrics.clip_score.checkpoint .*wrong.pt' does not hold open_clip weights"):
        ClipScore(str(wrong), arch=str(arch), device="cpu")
