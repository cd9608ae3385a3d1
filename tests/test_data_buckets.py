"""Buckets: sizes, assignment (never upscale), crop geometry."""

import math
import random

import pytest

from aitk.data.buckets import MAX_ASPECT, bucket_sizes, choose_bucket, crop_geometry


@pytest.mark.parametrize(("res", "d"), [(512, 64), (1024, 64), (768, 16), (500, 64), (64, 64), (256, 8)])
def test_bucket_sizes_properties(res, d):
    sizes = bucket_sizes(res, d)
    assert sizes
    for w, h in sizes:
        assert w % d == 0 and h % d == 0 and w >= d and h >= d
        assert w * h <= res * res
        assert max(w, h) / min(w, h) <= MAX_ASPECT
        assert (h, w) in sizes  # symmetric
        # on the frontier: growing either side exceeds the pixel budget
        assert (w + d) * h > res * res or max(w + d, h) / min(w + d, h) > MAX_ASPECT
    if res % d == 0:
        assert (res, res) in sizes


def test_bucket_sizes_sd_512():
    assert bucket_sizes(512, 64) == (
        (256, 1024), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (768, 320), (1024, 256),
    )


def test_bucket_resolution_below_divisibility_rejected():
    with pytest.raises(ValueError):
        bucket_sizes(32, 64)


def _sizes():
    rnd = random.Random(1234)
    sizes = [(1, 1), (7, 200), (63, 63), (64, 64), (65, 64), (64, 4000), (4000, 64), (100, 100),
             (300, 900), (530, 470), (511, 511), (512, 512), (513, 512), (600, 520), (5000, 300),
             (1920, 1080), (1080, 1920), (4032, 3024)]
    sizes += [(rnd.randint(1, 3000), rnd.randint(1, 3000)) for _ in range(400)]
    sizes += [(rnd.randint(1, 200), rnd.randint(1, 200)) for _ in range(200)]
    return sizes


@pytest.mark.parametrize("use_buckets", [True, False])
@pytest.mark.parametrize(("res", "d"), [(512, 64), (256, 16), (1024, 64)])
def test_choose_bucket_never_upscales(res, d, use_buckets):
    for w, h in _sizes():
        b = choose_bucket(w, h, res, d, use_buckets)
        if w < d or h < d:
            assert b is None, (w, h)
            continue
        assert b is not None, (w, h)
        bw, bh = b
        assert bw <= w and bh <= h, (w, h, b)
        assert bw % d == 0 and bh % d == 0 and bw >= d and bh >= d
        assert bw * bh <= res * res
        if not use_buckets:
            assert bw == bh
        geom = crop_geometry(w, h, bw, bh)
        sw, sh = geom.scaled
        assert bw <= sw <= w and bh <= sh <= h  # downscale only, and it covers the bucket
        left, top, right, bottom = geom.box
        assert 0 <= left and 0 <= top and right <= sw and bottom <= sh
        assert (right - left, bottom - top) == (bw, bh)


def test_choose_bucket_picks_closest_fitting_aspect():
    # big landscape photo: a standard bucket with aspect near 16:9
    assert choose_bucket(1920, 1080, 512, 64) == (640, 384)
    assert choose_bucket(1080, 1920, 512, 64) == (384, 640)
    assert choose_bucket(2000, 2000, 512, 64) == (512, 512)
    # fits only in 576x448 (512x512 is too tall)
    assert choose_bucket(700, 500, 512, 64) == (576, 448)


def test_small_image_gets_own_bucket():
    assert choose_bucket(520, 300, 512, 64) == (512, 256)
    assert choose_bucket(100, 100, 512, 64) == (64, 64)
    assert choose_bucket(200, 130, 512, 64, use_buckets=False) == (128, 128)


def test_random_crop_stays_inside():
    for u in [(0.0, 0.0), (0.999999, 0.999999), (0.5, 0.25)]:
        g = crop_geometry(1000, 400, 512, 256, u=u)
        l, t, r, b = g.box
        assert 0 <= l and r <= g.scaled[0] and 0 <= t and b <= g.scaled[1]
    assert crop_geometry(1000, 400, 512, 256, u=(0.999999, 0.0)).box[2] == crop_geometry(1000, 400, 512, 256).scaled[0]
    assert math.isclose(crop_geometry(1000, 400, 512, 256).scaled[1], 256)
