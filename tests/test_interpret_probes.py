"""Tests for studies/interpret_probes.py: occlusion, channel selectivity, channel ablation and
orientation selectivity on hand-made inputs, the masked head against masking the conv2 maps,
validation, and a tiny run."""

import json
import pathlib
import sys

import interpret
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "studies"))
import interpret_probes as probes  # noqa: E402


def test_interpret_probes_occlusion_on_hand_made_input():
    # p(class 0) = mean of the top-left 8x8 block; erasing a 6x6 patch lowers it by overlap / 64.
    def prob_fn(x):
        p0 = x[:, :8, :8, 0].mean((1, 2))
        return jnp.concatenate([p0[:, None], jnp.zeros((x.shape[0], 9))], 1)

    occ = np.asarray(probes.occlusion_map(prob_fn, jnp.ones((2, 28, 28, 1)), jnp.zeros(2, int)))
    starts = np.arange(0, 23, 2)
    overlap = np.clip(8 - starts, 0, 6)
    np.testing.assert_allclose(occ[0], np.outer(overlap, overlap) / 64, atol=1e-6)
    np.testing.assert_allclose(occ[1], occ[0])


def test_interpret_probes_ablation_masks_on_hand_made_activations():
    # Channel c fires only for class c (c < 10); channels 10-11 are noise.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    acts = rng.uniform(0, 0.1, (200, 12))
    acts[np.arange(200), labels] += 1.0
    masks = probes.ablation_masks(probes.channel_selectivity(acts, labels), 2)
    assert np.all(masks.sum(1) == 10) and np.all(masks[np.arange(10), np.arange(10)] == 0)


def test_interpret_probes_head_mask_equals_masking_conv2_maps():
    model = interpret.CNN(4, nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
    mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    a2 = model.forward(x)[1]["conv2"]
    expected = probes.head(model, interpret.max_pool2(a2 * mask))
    feats = interpret.max_pool2(a2)
    np.testing.assert_allclose(probes.masked_head(model, feats, mask), expected, atol=1e-5)
    y = jnp.array([0, 1, 1])
    acc = np.asarray(probes.per_class_accuracy(model, feats, y, mask[None]))[0]
    pred = np.asarray(expected).argmax(1)
    assert acc[1] == np.mean(pred[1:] == 1) and acc[0] == float(pred[0] == 0)
    assert np.isnan(acc[2])  # no digit of class 2: undefined, not silently 0 or 1


def test_interpret_probes_selectivity_on_hand_made_activations():
    # Channel c fires only for class c (c < 10); channels 10-11 are noise.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    acts = rng.uniform(0, 0.1, (200, 12))
    acts[np.arange(200), labels] += 1.0
    sel = probes.channel_selectivity(acts, labels)
    np.testing.assert_array_equal(sel.argmax(1), np.arange(10))


def test_interpret_probes_orientation_selectivity_hand_made():
    osi = probes.orientation_selectivity(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(osi, [0.0, 1.0], atol=1e-6)


def test_interpret_probes_bad_ablate_k_raises(tmp_path):
    with pytest.raises(ValueError, match="--ablate-k"):
        probes.main(probes.StudyConfig(ablate_k=32, out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_interpret_probes_bad_num_saliency_digits_raises(tmp_path):
    with pytest.raises(ValueError, match="--num-saliency-digits"):
        probes.main(probes.StudyConfig(num_saliency_digits=10_001, out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_interpret_probes_tiny_run(tmp_path):
    study = probes.StudyConfig(train_size=2000, epochs=1, width=8, num_saliency_digits=20,
                               out_dir=str(tmp_path))  # fmt: skip
    m = probes.main(study)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m and m["num_findings"] == 5
    assert 0.0 <= m["occlusion_flip_rate"] <= 1.0 and m["num_conv1_channels"] == 8
    assert 0.0 <= m["saliency_background_share"] <= 1.0 and 0 <= m["dream_channel_flips"] <= 10
    for name in ["report.md", "saliency.png", "ablation.png", "first_layer_channels.png"]:
        assert (tmp_path / name).stat().st_size > 0
