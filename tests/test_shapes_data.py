"""The synthetic shapes dataset (jaxsd.training.shapes) and its automatic judge (jaxsd.training.evaluate)."""
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from jaxsd.training import evaluate
from jaxsd.training import shapes as S


def test_batches_are_deterministic_from_the_seed():
    a, b = S.ShapesDataset(seed=3).batch(5, 16), S.ShapesDataset(seed=3).batch(5, 16)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    c = S.ShapesDataset(seed=4).batch(5, 16)
    assert not np.array_equal(a.images, c.images)
    # Resuming at batch i gives batch i.
    stream = S.ShapesDataset(seed=3).batches(16, start=5)
    np.testing.assert_array_equal(next(stream).images, a.images)


def test_images_show_what_their_captions_say():
    batch = S.ShapesDataset(seed=0).batch(0, 300)
    assert batch.images.shape == (300, 64, 64, 3) and batch.images.dtype == np.uint8
    s = batch.scenes
    for i, text in enumerate(batch.captions):
        p = S.parse_caption(text)
        assert (p.fg, p.bg, p.shape) == (s.fg[i], s.bg[i], s.shape[i]), text
        assert p.size in (None, s.size[i]) and p.position in (None, s.position[i]), text
        image = batch.images[i]
        # The corner is background; the shape's centre of mass... its box centre is foreground
        # for every shape but the triangle, whose centroid (2/3 of the way down) is inside it.
        assert tuple(image[0, 0]) == S.COLORS[S.COLOR_NAMES[p.bg]], text
        y = int(s.cy[i] + (s.half[i] / 3 if p.shape == 2 else 0))
        assert tuple(image[y, int(s.cx[i])]) == S.COLORS[S.COLOR_NAMES[p.fg]], text
        # The whole shape is inside the image.
        assert s.half[i] + 1 - 1e-4 <= s.cx[i] <= 64 - s.half[i] - 1 + 1e-4


def test_attributes_are_balanced():
    s = S.sample_scenes(np.random.default_rng(0), 20_000)
    for values, k in ((s.shape, len(S.SHAPES)), (s.fg, len(S.COLOR_NAMES)), (s.bg, len(S.COLOR_NAMES)),
                      (s.size, len(S.SIZE_NAMES)), (s.position, len(S.POSITION_NAMES))):
        share = np.bincount(values, minlength=k) / len(values)
        # Held-out triples make the split slightly uneven, by construction at most +-15%.
        assert np.all(np.abs(share * k - 1) < 0.15), share
    assert np.all(s.fg != s.bg)


def test_held_out_split_is_disjoint_and_keeps_every_pair():
    train, held = S.all_triples("train"), S.all_triples("heldout")
    assert len(train) + len(held) == 8 * 7 * 4 and len(held) >= 20
    assert not set(map(tuple, train)) & set(map(tuple, held))
    # Every pair of attributes in a held-out triple occurs in training.
    for a, b in itertools.combinations(range(3), 2):
        seen = {(t[a], t[b]) for t in train}
        assert all((t[a], t[b]) in seen for t in held)
    # Training never draws a held-out triple, and never says an evaluation prompt verbatim.
    prompts = S.evaluation_prompts()
    assert len(prompts) >= 200 and len({p.text for p in prompts}) == len(prompts)
    texts = {p.text for p in prompts}
    data = S.ShapesDataset(seed=0)
    for i in range(20):
        batch = data.batch(i, 256)
        assert not np.any(S.is_held_out(batch.scenes.fg, batch.scenes.bg, batch.scenes.shape))
        assert not texts & set(batch.captions)
    for p in prompts:
        assert S.is_held_out(p.fg, p.bg, p.shape) and S.parse_caption(p.text) == p


def test_parse_caption_names_what_is_missing():
    with pytest.raises(ValueError, match="needs two of"):
        S.parse_caption("a red circle")
    with pytest.raises(ValueError, match="split='valid'"):
        S.ShapesDataset(split="valid")


def _truth(batch):
    s = batch.scenes
    return [S.Prompt("", *(int(v[i]) for v in (s.fg, s.bg, s.shape, s.size, s.position)))
            for i in range(len(s.fg))]


def test_judge_is_exact_on_clean_renders():
    batch = S.ShapesDataset(seed=11).batch(0, 400)
    scores = evaluate.score(_truth(batch), batch.images)
    assert scores.all == 1.0, scores


def test_judge_is_robust_to_noise_and_blur():
    batch = S.ShapesDataset(seed=12).batch(0, 300)
    rng = np.random.default_rng(0)
    noisy = np.clip(batch.images + rng.normal(0, 25, batch.images.shape), 0, 255).astype(np.uint8)
    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1))) for x in batch.images])
    for images in (noisy, blurred):
        scores = evaluate.score(_truth(batch), images)
        assert scores.colors >= 0.99 and scores.shape >= 0.97, scores


def test_judge_sees_no_shape_in_a_blank_image():
    blank = np.full((64, 64, 3), S.COLORS["blue"], np.uint8)
    j = evaluate.judge(blank)
    assert j.bg == S.COLOR_NAMES.index("blue") and j.fg == -1 and j.shape == -1
    with pytest.raises(ValueError, match="got shape"):
        evaluate.judge(blank[..., 0])


class _PerfectAutoencoder:
    """Stands in for a pipeline whose VAE gives back exactly what it was given."""

    def encode_image(self, pixels, key):
        return pixels

    def decode(self, latents):
        return np.round((np.asarray(latents) + 1) * 127.5).astype(np.uint8)


def test_evaluate_autoencoder_scores_a_perfect_autoencoder_full_marks():
    s = evaluate.evaluate_autoencoder(_PerfectAutoencoder(), n=60, batch_size=25)
    assert s.n == 60 and s.colors == s.shape == s.size == s.position == s.all == 1.0


def test_judge_validation_on_clean_renders_is_perfect():
    s = evaluate.validate_on_renders(n=50)
    assert s.n == 50 and s.colors == s.shape == s.size == s.position == s.all == 1.0
