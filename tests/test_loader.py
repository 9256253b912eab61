"""Transforms (against PIL / torchvision on small images) and episode loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance

from smat.data.episodes import Episode
from smat.data.loader import EpisodeTensors, load_episode
from smat.data.store import convert_imagefolder
from smat.io import SmatError
from smat.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, image_jitter, normalise, random_resized_crop_boxes, resized_crops, test_transform,
    train_transform,
)

PIL_PIPELINE_TAIL = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def smooth_images(k, size, seed=0):
    """Random but smooth uint8 images (interpolation differences stay small on them)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (k, 3, 4, 4)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().copy()


def test_jitter_matches_pil_image_enhance():
    images = np.random.default_rng(0).integers(0, 256, (6, 9, 9, 3), dtype=np.uint8)
    factors = 1 + 0.4 * (2 * torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) - 1)
    factors[0] = torch.tensor([1.4, 0.6, 1.4])  # extremes: clipping in every step
    ours = image_jitter(torch.from_numpy(images).permute(0, 3, 1, 2).float(), factors)
    for image, (b, c, s), out in zip(images, factors.tolist(), ours):
        pil = Image.fromarray(image)
        for enhance, factor in ((ImageEnhance.Brightness, b), (ImageEnhance.Contrast, c), (ImageEnhance.Color, s)):
            pil = enhance(pil).enhance(factor)
        expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
        assert (out - expected).abs().max() <= 1  # PIL's float arithmetic, up to one grey level
        assert (out == expected).float().mean() > 0.99


def test_normalise_matches_torchvision():
    image = np.random.default_rng(2).integers(0, 256, (7, 7, 3), dtype=np.uint8)
    ours = normalise(torch.from_numpy(image).permute(2, 0, 1).float()[None])[0]
    torch.testing.assert_close(ours, PIL_PIPELINE_TAIL(Image.fromarray(image)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [16, 32])
def test_test_transform_matches_torchvision_pil_pipeline(size):
    images = smooth_images(3, size)
    reference = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), PIL_PIPELINE_TAIL])
    ours = test_transform(size)(images)
    assert ours.shape == (3, 3, size, size) and ours.dtype == torch.float32
    for image, out in zip(images, ours):
        # one grey level (PIL rounds to uint8) is 1/255/0.225 = 0.017 after normalisation
        assert (out - reference(Image.fromarray(image))).abs().max() < 0.04


def test_resized_crops_match_torchvision_resized_crop():
    images = smooth_images(3, 24, seed=3)
    boxes = torch.tensor([[0, 0, 24, 24], [3, 5, 10, 14], [10, 2, 13, 9]])
    # crops of an S x S image resized to S x S: the training case, where crops are only ever enlarged
    flip = torch.tensor([False, True, False])
    ours = resized_crops(torch.from_numpy(images).permute(0, 3, 1, 2).float(), boxes, 24, flip)
    for image, (top, left, h, w), flipped, out in zip(images, boxes.tolist(), flip, ours):
        expected = TF.resized_crop(Image.fromarray(image), top, left, h, w, [24, 24])
        expected = TF.hflip(expected) if flipped else expected
        diff = (out - torch.from_numpy(np.array(expected)).permute(2, 0, 1).float()).abs()
        # PIL clamps at the crop's edge, grid_sample blends in the pixel just outside it: compare the interior
        assert diff[:, 1:-1, 1:-1].max() <= 1.0


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    generator = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(4000, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), generator)
    top, left, h, w = boxes.T.float()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 32 ** 2
    assert area.min() >= 0.05 and area.max() <= 1.0 and 0.45 < area.mean() < 0.6  # ~U(0.08, 1) up to rounding
    assert ((w / h) > 0.6).all() and ((w / h) < 1.6).all()
    small = random_resized_crop_boxes(500, 32, 32, (0.5, 0.6), (3 / 4, 4 / 3), generator)
    assert ((small[:, 2] * small[:, 3]).float() / 32 ** 2).max() < 0.7


def test_train_transform_is_seeded_and_random_per_image():
    images = np.repeat(smooth_images(1, 32, seed=4), 64, axis=0)
    transform = train_transform(32)
    first = transform(images, torch.Generator().manual_seed(5))
    again = transform(images, torch.Generator().manual_seed(5))
    other = transform(images, torch.Generator().manual_seed(6))
    assert first.shape == (64, 3, 32, 32) and first.dtype == torch.float32
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    # identical inputs, different per-image crops/jitter/flips
    assert len({tuple(x.flatten()[:50].tolist()) for x in first}) == 64
    low = (torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (torch.ones(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    per_channel = first.permute(1, 0, 2, 3).flatten(1)
    assert (per_channel.min(1).values >= low - 1e-5).all() and (per_channel.max(1).values <= high + 1e-5).all()


def test_train_transform_rejects_bad_crop_scale():
    with pytest.raises(SmatError, match=r"crop_scale \(0.5, 1.5\)"):
        train_transform(32, crop_scale=(0.5, 1.5))


def test_train_transform_flips_about_half():
    image = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    image[0, :, :4] = 255  # left half white
    transform = train_transform(8, crop_scale=(1.0, 1.0))  # full-image crop up to the aspect ratio draw
    out = transform(np.repeat(image, 400, axis=0), torch.Generator().manual_seed(0))
    left_brighter = out[:, :, :, 0].mean(dim=(1, 2)) > out[:, :, :, -1].mean(dim=(1, 2))
    assert 0.4 < left_brighter.float().mean() < 0.6


@pytest.fixture()
def coded_store(tmp_path):
    """Each image is one flat colour that encodes (class, image): red = 40 * class, green = 20 * index."""
    for c in range(3):
        (tmp_path / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (40 * c, 20 * i, 100)).save(tmp_path / "raw" / f"class{c}" / f"{i}.png")
    return convert_imagefolder(tmp_path / "raw", tmp_path / "store")


def test_load_episode_shapes_labels_and_order(coded_store):
    episode = Episode(classes=[2, 0], support=[[5, 1], [0]], query=[[3], [2, 4]])
    tensors = load_episode(coded_store, episode, test_transform(8))
    assert isinstance(tensors, EpisodeTensors) and tensors.n_way == 2
    assert tensors.support_x.shape == (3, 3, 8, 8) and tensors.query_x.shape == (3, 3, 8, 8)
    assert tensors.support_y.tolist() == [0, 0, 1] and tensors.query_y.tolist() == [0, 1, 1]
    assert tensors.support_y.dtype == torch.long
    std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
    pixels = (tensors.support_x[:, :, 4, 4] * std + mean) * 255  # undo the normalisation
    torch.testing.assert_close(pixels, torch.tensor([[80.0, 100, 100], [80, 20, 100], [0, 0, 100]]),
                               atol=1e-3, rtol=0)
    query_pixels = (tensors.query_x[:, :, 0, 0] * std + mean) * 255
    expected = torch.tensor([[80.0, 60], [0, 40], [0, 80]])
    torch.testing.assert_close(query_pixels[:, :2], expected, atol=1e-3, rtol=0)
    moved = tensors.to("cpu")
    assert torch.equal(moved.query_x, tensors.query_x) and moved.n_way == 2


def test_load_episode_with_train_transform_is_seeded(coded_store):
    episode = Episode(classes=[0, 1, 2], support=[[0], [1], [2]], query=[[3], [4], [5]])
    transform = train_transform(8)
    a = load_episode(coded_store, episode, transform, torch.Generator().manual_seed(0))
    b = load_episode(coded_store, episode, transform, torch.Generator().manual_seed(0))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert a.query_y.tolist() == [0, 1, 2]
