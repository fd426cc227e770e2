import numpy as np
import pytest

from micl.config import load_config
from micl.data.masking import (
    ViewPairMasks,
    VisibleMaskedMasks,
    patches_per_view,
    sample_mae_mask,
    sample_rng,
    sample_view_indices,
)
from micl.objectives import stream_spec


@pytest.mark.parametrize(
    ("num_patches", "ratio", "k"), [(196, 0.9, 9), (49, 0.5, 12), (196, 0.75, 24)]
)
def test_views_are_disjoint_and_sized(num_patches, ratio, k):
    v1, v2 = sample_view_indices(64, num_patches, ratio, np.random.default_rng(0))
    assert v1.shape == v2.shape == (64, k)
    assert patches_per_view(num_patches, ratio) == k
    for a, b in zip(v1, v2, strict=True):
        assert len(set(a)) == k and len(set(b)) == k  # no repeats within a view
        assert not set(a) & set(b)
        assert a.min() >= 0 and max(a.max(), b.max()) < num_patches


def test_every_patch_equally_likely():
    # Chi-square goodness of fit of patch counts per view against the uniform distribution.
    L, draws = 49, 4000
    v1, v2 = sample_view_indices(draws, L, 0.5, np.random.default_rng(123))
    for view in (v1, v2):
        counts = np.bincount(view.ravel(), minlength=L)
        expected = view.size / L
        chi2 = ((counts - expected) ** 2 / expected).sum()
        # 48 degrees of freedom: the 99.9% quantile is 84.0.
        assert chi2 < 84.0, chi2


def test_deterministic_given_seed():
    a = sample_view_indices(8, 196, 0.9, np.random.default_rng(7))
    b = sample_view_indices(8, 196, 0.9, np.random.default_rng(7))
    c = sample_view_indices(8, 196, 0.9, np.random.default_rng(8))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not (a[0] == c[0]).all()


def test_sample_rng_depends_on_seed_epoch_and_sample():
    draw = lambda *key: sample_rng(*key).random()  # noqa: E731
    assert draw(0, 1, 5) == draw(0, 1, 5)
    assert len({draw(0, 1, 5), draw(1, 1, 5), draw(0, 2, 5), draw(0, 1, 6)}) == 4


def test_mask_ratio_leaving_no_patch_raises():
    with pytest.raises(ValueError, match="leaves no patch"):
        sample_view_indices(2, 49, 0.99, np.random.default_rng(0))


def test_mae_mask_partitions_patches():
    vis, masked = sample_mae_mask(16, 196, 0.75, np.random.default_rng(0))
    assert vis.shape == (16, 49) and masked.shape == (16, 147)
    full = np.sort(np.concatenate([vis, masked], axis=1), axis=1)
    assert (full == np.arange(196)).all()


def test_per_sample_samplers_give_int64_index_arrays():
    rng = np.random.default_rng(0)
    views = ViewPairMasks(49, 0.5)(rng)
    assert set(views) == {"view1", "view2"}
    for v in views.values():
        assert v.dtype == np.int64 and v.shape == (patches_per_view(49, 0.5),)
    assert not set(views["view1"]) & set(views["view2"])
    mae = VisibleMaskedMasks(196, 0.75, prefix="strong_")(rng)
    assert set(mae) == {"strong_visible", "strong_masked"}
    assert mae["strong_visible"].shape == (49,) and mae["strong_masked"].shape == (147,)
    assert all(v.dtype == np.int64 for v in mae.values())
    assert (np.sort(np.concatenate(list(mae.values()))) == np.arange(196)).all()


@pytest.mark.parametrize(("method", "columns"), [
    ("micl", {"view1": 12, "view2": 12}),
    ("mae", {"visible": 12, "masked": 37}),
    ("macrl", {"visible": 12, "masked": 37, "strong_visible": 4, "strong_masked": 45}),
])
def test_stream_spec_draws_each_methods_masks_from_the_sample_rng(method, columns):
    ratio = {"micl": 0.5, "mae": 0.75, "macrl": 0.75}[method]
    cfg = load_config(overrides=[f"method.name={method}", f"method.mask_ratio={ratio}"])
    spec = stream_spec(cfg)  # 28 px, patch 4: 49 patches
    assert set(spec.views) == ({"image", "image_strong"} if method == "macrl" else {"image"})
    masks = spec.draw_masks(sample_rng(0, 1, 5))
    assert {k: v.shape[0] for k, v in masks.items()} == columns
    assert all(v.dtype == np.int64 for v in masks.values())
    again = spec.draw_masks(sample_rng(0, 1, 5))  # the same sample and epoch: the same masks
    assert all((masks[k] == again[k]).all() for k in masks)
    other = spec.draw_masks(sample_rng(0, 2, 5))
    assert any((masks[k] != other[k]).any() for k in masks)
