"""The CIFAR-10-C corruptions: shapes, determinism, severity ordering, PIL agreement, `tta corrupt`."""

from __future__ import annotations

import io
import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tta_cli.corrupt import ALL_CORRUPTIONS, CORRUPTIONS, DETERMINISTIC, EXTRA_CORRUPTIONS, corrupt, resolve_corruptions
from tta_cli.corrupt.ops import hsv_to_rgb, rgb_to_hsv
from tta_cli.errors import TTAError


@pytest.fixture(scope="module")
def smooth_images() -> torch.Tensor:
    """8 smooth-ish 32x32 images (gradients + blobs + a little texture), uint8 (8, 32, 32, 3)."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:32, 0:32] / 31.0
    images = []
    for index in range(8):
        phase = rng.uniform(0, 2 * np.pi, 3)
        channels = [0.5 + 0.35 * np.sin(3 * rows + 2 * cols + p + index) for p in phase]
        image = np.stack(channels, -1) + rng.normal(0, 0.03, (32, 32, 3))
        image[8:20, 10:24] += 0.15
        images.append(np.clip(image, 0, 1) * 255)
    return torch.from_numpy(np.stack(images).astype(np.uint8))


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared difference between horizontal and vertical neighbours."""
    values = images.double()
    return float(((values[:, 1:] - values[:, :-1]) ** 2).mean() + ((values[:, :, 1:] - values[:, :, :-1]) ** 2).mean())


def test_names_are_the_15_benchmark_plus_4_extra_in_canonical_order():
    assert len(CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert ALL_CORRUPTIONS == CORRUPTIONS + EXTRA_CORRUPTIONS
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"


def test_resolve_corruptions_expands_groups_and_keeps_canonical_order():
    assert resolve_corruptions(None) == list(CORRUPTIONS)
    assert resolve_corruptions("all") == list(CORRUPTIONS)
    assert resolve_corruptions("extra") == list(EXTRA_CORRUPTIONS)
    assert resolve_corruptions("fog,gaussian_noise") == ["gaussian_noise", "fog"]
    assert resolve_corruptions(["saturate", "Shot-Noise"]) == ["shot_noise", "saturate"]


def test_unknown_corruption_is_a_user_error_listing_valid_names():
    with pytest.raises(TTAError, match="valid: all, extra, gaussian_noise"):
        resolve_corruptions("gaussian_noize")
    with pytest.raises(TTAError, match="saturate"):
        corrupt(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), "rain", 1)


@pytest.mark.parametrize("severity", [0, 6, True])
def test_severity_outside_one_to_five_is_a_user_error(severity):
    with pytest.raises(TTAError, match="severity"):
        corrupt(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), "fog", severity)


def test_wrong_image_dtype_or_shape_is_a_user_error():
    with pytest.raises(TTAError, match=r"\(N, H, W, 3\)"):
        corrupt(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "fog", 1)
    with pytest.raises(TTAError, match="uint8"):
        corrupt(torch.zeros(1, 32, 32, 3), "fog", 1)


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_every_severity_keeps_shape_dtype_and_device(name, smooth_images):
    images = smooth_images[:3]
    for severity in range(1, 6):
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_same_seed_same_output_and_random_ones_change_with_seed(name, smooth_images):
    images = smooth_images[:4]
    first = corrupt(images, name, 3, seed=5)
    assert torch.equal(first, corrupt(images, name, 3, seed=5))
    if name not in DETERMINISTIC:
        assert not torch.equal(first, corrupt(images, name, 3, seed=6))


def test_one_seed_draws_the_same_noise_field_at_every_severity(smooth_images):
    clean = smooth_images.double()
    mild = corrupt(smooth_images, "gaussian_noise", 1, seed=4).double() - clean
    strong = corrupt(smooth_images, "gaussian_noise", 5, seed=4).double() - clean
    other_seed = corrupt(smooth_images, "gaussian_noise", 5, seed=5).double() - clean
    assert torch.corrcoef(torch.stack((mild.flatten(), strong.flatten())))[0, 1] > 0.9
    assert abs(torch.corrcoef(torch.stack((mild.flatten(), other_seed.flatten())))[0, 1]) < 0.1


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"])
def test_noise_grows_with_severity(name, smooth_images):
    spread = [float((corrupt(smooth_images, name, s, seed=0).double() - smooth_images.double()).std()) for s in range(1, 6)]
    assert all(a < b for a, b in pairwise(spread)), spread


@pytest.mark.parametrize("name", ["defocus_blur", "zoom_blur", "gaussian_blur", "pixelate"])
def test_blur_removes_more_high_frequencies_with_severity(name, smooth_images):
    energy = [high_frequency_energy(corrupt(smooth_images, name, s)) for s in range(1, 6)]
    assert energy[0] < high_frequency_energy(smooth_images)
    assert all(a >= b for a, b in pairwise(energy)), energy


def test_motion_blur_lowers_high_frequencies(smooth_images):
    clean = high_frequency_energy(smooth_images)
    assert high_frequency_energy(corrupt(smooth_images, "motion_blur", 5)) < 0.8 * clean


def test_contrast_lowers_pixel_spread_with_severity(smooth_images):
    spread = [float(corrupt(smooth_images, "contrast", s).double().std()) for s in range(1, 6)]
    assert all(a > b for a, b in pairwise(spread)), spread


def test_brightness_raises_mean_with_severity(smooth_images):
    means = [float(corrupt(smooth_images, "brightness", s).double().mean()) for s in range(1, 6)]
    assert all(a < b for a, b in pairwise(means)), means


@pytest.mark.parametrize("name", ["fog", "frost", "snow"])
def test_weather_moves_images_further_from_clean_at_severity_5_than_1(name, smooth_images):
    def distance(severity: int) -> float:
        return float((corrupt(smooth_images, name, severity, seed=0).double() - smooth_images.double()).abs().mean())

    assert distance(1) < distance(5)


def test_jpeg_matches_pil_at_the_same_quality(smooth_images):
    for severity, quality in zip(range(1, 6), (80, 65, 58, 50, 40), strict=True):
        expected = []
        for image in smooth_images.numpy():
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "JPEG", quality=quality)
            expected.append(np.asarray(Image.open(buffer)))
        assert np.array_equal(corrupt(smooth_images, "jpeg_compression", severity).numpy(), np.stack(expected))


def test_pixelate_matches_pil_box_resizing(smooth_images):
    for severity, factor in zip(range(1, 6), (0.95, 0.9, 0.85, 0.75, 0.65), strict=True):
        expected = [
            np.asarray(Image.fromarray(image).resize((int(32 * factor),) * 2, Image.BOX).resize((32, 32), Image.BOX))
            for image in smooth_images.numpy()
        ]
        assert np.array_equal(corrupt(smooth_images, "pixelate", severity).numpy(), np.stack(expected))


def test_hsv_round_trip_is_identity_in_float64(smooth_images):
    unit = smooth_images.permute(0, 3, 1, 2).double() / 255
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(unit)), unit, atol=1e-12)


def test_glass_blur_severity_1_only_shuffles_pixels_locally(smooth_images):
    out = corrupt(smooth_images, "glass_blur", 1, seed=0)
    assert torch.equal(out[:, :2, :2], smooth_images[:, :2, :2])  # the swap loop never visits rows/cols 0-1
    assert not torch.equal(out, smooth_images)


def test_empty_batch_passes_through():
    empty = torch.zeros(0, 32, 32, 3, dtype=torch.uint8)
    assert corrupt(empty, "snow", 2).shape == (0, 32, 32, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_cuda_output_stays_on_cuda_and_deterministic_ones_match_cpu(name, smooth_images):
    gpu = corrupt(smooth_images.cuda(), name, 4, seed=0)
    assert gpu.is_cuda and gpu.dtype == torch.uint8
    if name in DETERMINISTIC:
        difference = (gpu.cpu().int() - corrupt(smooth_images, name, 4, seed=0).int()).abs()
        assert int(difference.max()) <= 1


# --- the CLI -------------------------------------------------------------------------------------


def run_cli(args: list[str]):
    from tta_cli.cli import app

    return CliRunner().invoke(app, args)


def test_cli_writes_the_official_layout_that_load_shifted_reads_back(tiny_folder, tmp_path):
    from tta_cli.data.shifted import load_shifted

    out = tmp_path / "c"
    result = run_cli(["corrupt", "--data", str(tiny_folder), "--out", str(out), "--corruptions", "fog,contrast", "--seed", "3"])
    assert result.exit_code == 0, result.output
    labels = np.load(out / "labels.npy")
    fog = np.load(out / "fog.npy")
    count = labels.shape[0] // 5
    assert count == 6 and labels.dtype == np.uint8
    assert fog.shape == (5 * count, 32, 32, 3) and fog.dtype == np.uint8
    assert np.array_equal(labels, np.tile(labels[:count], 5))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["class_names"] == ["cat", "dog", "frog"] and meta["corruptions"] == ["fog", "contrast"]
    sets = load_shifted(out, severities=(2, 5))
    assert [(s.meta["corruption"], s.meta["severity"]) for s in sets] == [("fog", 2), ("fog", 5), ("contrast", 2), ("contrast", 5)]
    assert np.array_equal(sets[1].images.numpy(), fog[4 * count :])
    assert sets[0].class_names == ["cat", "dog", "frog"]


def test_cli_severity_blocks_equal_corrupt_with_the_same_seed(tiny_folder, tmp_path):
    from tta_cli.corrupt.writer import block_seed
    from tta_cli.data.imageset import mix_classes
    from tta_cli.data.sources import load_split

    out = tmp_path / "c"
    assert run_cli(["corrupt", "--data", str(tiny_folder), "--out", str(out), "--corruptions", "shot_noise", "--device", "cpu"]).exit_code == 0
    clean, order = mix_classes(load_split(str(tiny_folder), "test"), seed=0)
    assert order is not None and sorted(order) == list(range(len(clean)))  # class folders are written mixed
    assert json.loads((out / "meta.json").read_text())["source_order"] == order
    stacked = np.load(out / "shot_noise.npy")
    count = len(clean)
    assert np.array_equal(stacked[2 * count : 3 * count], corrupt(clean.images, "shot_noise", 3, seed=block_seed(0, 3, 0)).numpy())
    assert not np.array_equal(stacked[:count], corrupt(clean.images, "shot_noise", 1, seed=block_seed(0, 3, 0)).numpy())


def test_cli_preview_writes_a_png(tiny_folder, tmp_path):
    preview = tmp_path / "grid.png"
    result = run_cli(
        [
            "corrupt",
            "--data",
            str(tiny_folder),
            "--out",
            str(tmp_path / "c"),
            "--corruptions",
            "snow,pixelate",
            "--severities",
            "1,5",
            "--preview",
            str(preview),
        ]
    )
    assert result.exit_code == 0, result.output
    with Image.open(preview) as picture:
        assert picture.format == "PNG" and picture.width > 100


def test_cli_bad_corruption_exits_2_with_one_line(tiny_folder, tmp_path):
    result = run_cli(["corrupt", "--data", str(tiny_folder), "--out", str(tmp_path / "c"), "--corruptions", "gaussian_noize"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown corruption" in lines[0]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("severities", ["0", "1,7", "x"])
def test_cli_bad_severities_exit_2(tiny_folder, tmp_path, severities):
    result = run_cli(["corrupt", "--data", str(tiny_folder), "--out", str(tmp_path / "c"), "--severities", severities])
    assert result.exit_code == 2 and "--severities" in result.output


def test_cli_needs_out(tiny_folder):
    result = run_cli(["corrupt", "--data", str(tiny_folder)])
    assert result.exit_code == 2 and "--out" in result.output
