"""sgm.metrics: prompts -> digits, DigitMetrics (metrics.json's judge), ink colour."""

import pytest
import torch

from sgm.metrics.digits import (DigitMetrics, digit_from_prompt, digit_metrics, held_out_digits, ink_colour,
                                load_reference_stats, red_ink_share, reference_stats)


@pytest.mark.parametrize("prompt, digit", [
    ("a handwritten digit 3", 3), ("a handwritten digit seven", 7), ("A handwritten digit Nine.", 9),
    ("a digit seven, in red ink", 7), ("digit 7 and digit seven", 7),
    ("a red cube", None), ("digit 12", None), ("a 3 and a 5", None), ("3.5 stars", None), ("someone", None),
])
def test_digit_from_prompt(prompt, digit):
    assert digit_from_prompt(prompt) == digit


@pytest.fixture(scope="module")
def held_out():
    return held_out_digits()


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_shipped_reference_stats_are_those_of_the_held_out_digits(held_out):
    reference, _ = held_out
    shipped, fresh = load_reference_stats(), reference_stats(reference)
    assert set(shipped) == set(fresh)
    for k in fresh:
        torch.testing.assert_close(shipped[k].double(), fresh[k].double(), rtol=1e-5, atol=1e-3)
    # the stats stand in for the images: the same Fréchet distance either way
    x = reference[:100].expand(-1, 3, -1, -1)
    a = digit_metrics(x, None, reference=reference)["frechet_distance"]
    b = digit_metrics(x, None)["frechet_distance"]
    assert a == pytest.approx(b, rel=1e-4)


def test_digit_metrics_judge_images_against_their_prompts(held_out):
    reference, labels = held_out
    x = reference[::5].expand(-1, 3, -1, -1)  # 100 real digits, 10 of each
    y = labels[::5]
    metrics = DigitMetrics()
    right = metrics(x, [f"a handwritten digit {int(d)}" for d in y])
    wrong = metrics(x, [f"a handwritten digit {(int(d) + 1) % 10}" for d in y])
    assert right["labelled_images"] == 100 and right["accuracy"] >= 0.97 and wrong["accuracy"] < 0.1
    assert right["frechet_distance"] == wrong["frechet_distance"] > 0
    mixed = metrics(x, ["a handwritten digit 3"] * 50 + ["a red cube"] * 50)
    assert mixed["labelled_images"] == 50
    assert metrics(x, ["a red cube"] * 100) == {}  # not a digit run: not judged
    # other sizes are resized to the classifier's 32x32
    big = torch.nn.functional.interpolate(x, size=(64, 64), mode="nearest")
    assert metrics(big, [f"a handwritten digit {int(d)}" for d in y])["accuracy"] >= 0.95


def test_digit_metrics_config_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="min_images"):
        DigitMetrics(min_images=1)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        DigitMetrics(reference_stats=str(tmp_path / "missing.safetensors"))


def test_red_ink_is_measured_and_the_classifier_reads_coloured_ink(held_out):
    reference, labels = held_out
    white = reference[:100].expand(-1, 3, -1, -1).clone()
    red = white.clone()
    red[:, 1:] = (white[:, 1:] + 1) * 0.1 - 1  # ink (0.9+, 0.1, 0.1) on black
    assert red_ink_share(white) == 0.0 and red_ink_share(red) == 1.0
    colour = ink_colour(red)
    assert (colour[:, 0] > 0.7).all() and (colour[:, 1:] < 0.15).all()
    assert digit_metrics(red, labels[:100], reference)["accuracy"] >= 0.97
