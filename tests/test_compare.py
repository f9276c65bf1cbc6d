"""harmonica.compare on a tiny setup: a random 28x28 DiT, a random classifier and reference statistics.

The numbers mean nothing about quality; the checks are that every row and column is what it claims to
be (same noise for every row, metrics computed on that row's images, the schedules' own CUR/speedup).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DiTTransformer2DModel

import harmonica as hc
from harmonica import evaluate
from harmonica.compare import compare
import harmonica.testbed as tb
from harmonica.testbed import generate
from harmonica.testbed.classifier import FMNISTClassifier
from harmonica.testbed.data import CLASS_NAMES
from harmonica.testbed.model import SCHEDULER_CONFIG


# Tiny models: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

STEPS = 4
BLOCKS = 2
N = 12


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=28, patch_size=7, in_channels=1, out_channels=1, num_layers=BLOCKS, num_attention_heads=2,
        attention_head_dim=8, num_embeds_ada_norm=10,
    ).eval().requires_grad_(False)
    bed = tb.Testbed(transformer=transformer, scheduler_config=dict(SCHEDULER_CONFIG), class_names=CLASS_NAMES,
                  null_class=10, image_size=28, in_channels=1)
    classifier = FMNISTClassifier().eval().requires_grad_(False)
    feats = evaluate.classifier_features(torch.rand(64, 1, 28, 28) * 2 - 1, classifier)
    reference = evaluate.feature_statistics(feats)
    router = hc.Router.init(STEPS, BLOCKS, generator=torch.Generator().manual_seed(1),
                            metadata={"method": "harmonica", "threshold": 0.5})
    table = compare(bed, routers={"harmonica": router}, num_samples=N, steps=STEPS, guidance_scale=2.0,
                    batch_size=5, timing_samples=4, timing_repeats=2, classifier=classifier, reference=reference)
    return bed, classifier, reference, router, table


def test_rows_and_columns(setup):
    bed, _, _, router, table = setup
    names = [r.method for r in table.rows]
    assert names[0] == "uncached (DDIM 4)"
    assert names[2:] == ["FORA (interval 2)", "Delta-DiT", "harmonica"]
    schedule = router.to_schedule(0.5)
    cost = hc.model_cost(bed.transformer, batch=8)
    row = table.rows[-1]
    assert row.cur == schedule.cache_usage
    assert row.theoretical_speedup == pytest.approx(schedule.theoretical_speedup(cost))
    fora = table.rows[2]
    assert fora.cur == 0.5
    # Fewer steps is matched to the harmonica row and never faster than it in theory.
    fewer = table.rows[1]
    assert fewer.steps == math.ceil(STEPS / row.theoretical_speedup)
    assert fewer.theoretical_speedup == STEPS / fewer.steps <= row.theoretical_speedup
    for r in table.rows:
        assert r.seconds > 0 and r.measured_speedup > 0
        assert math.isfinite(r.fid_fmnist) and 0 <= r.accuracy <= 1
    assert table.rows[0].psnr is None and table.rows[0].measured_speedup == 1.0
    doc = json.loads(json.dumps(table.to_json()))
    assert [r["method"] for r in doc["rows"]] == names
    md = table.markdown()
    assert md.count("\n| ") == len(names) + 1 and "FID-FMNIST" in md and "measured speedup" in md


def test_metrics_are_those_of_each_rows_images(setup):
    bed, classifier, reference, router, table = setup
    labels = torch.arange(N) % 10
    uncached = generate(bed, labels, seed=0, num_inference_steps=STEPS, guidance_scale=2.0, batch_size=5)
    assert table.rows[0].fid_fmnist == pytest.approx(evaluate.fid_fmnist(uncached, classifier, reference))
    hc.enable_cache(bed.transformer, router.to_schedule(0.5))
    try:
        cached = generate(bed, labels, seed=0, num_inference_steps=STEPS, guidance_scale=2.0, batch_size=5)
    finally:
        hc.disable_cache(bed.transformer)
    row = table.rows[-1]
    assert row.fid_fmnist == pytest.approx(evaluate.fid_fmnist(cached, classifier, reference))
    assert row.accuracy == pytest.approx(evaluate.classifier_accuracy(cached, labels, classifier))
    assert row.psnr == pytest.approx(float(evaluate.psnr(cached, uncached).clamp(max=1e3).mean()))
    # The strict judge is the bundled one (not overridden here); precision/recall live in the FID
    # classifier's feature space, against as many test images as samples.
    assert row.strict_accuracy == pytest.approx(
        evaluate.classifier_accuracy(cached, labels, evaluate.load_classifier("cpu", "strict")))
    expected = evaluate.precision_recall(evaluate.classifier_features(cached, classifier),
                                         evaluate.real_features(N, classifier=classifier))
    assert (row.precision, row.recall) == pytest.approx(expected)
    assert row.psnr < 1e3  # caching changed the images: same noise, different computation


def test_router_for_other_step_count_is_rejected(setup):
    bed, classifier, reference, _, _ = setup
    with pytest.raises(ValueError, match="router 'x' has 5 steps but the table samples 4"):
        compare(bed, routers={"x": hc.Router.init(5, BLOCKS)}, num_samples=4, steps=STEPS,
                classifier=classifier, reference=reference)


def test_bundled_routers_load_and_fit_the_testbed_dit():
    from harmonica.testbed.routers import available, load_router

    assert {("harmonica", "ddim", 20), ("l2c", "ddim", 20)} <= set(available())
    dit = tb.load().transformer
    trained_step = json.loads((tb.DIT_DIR / "training.json").read_text())["step"]
    for method in ("harmonica", "l2c"):
        router = load_router(method, "ddim", 20)
        assert router.metadata["method"] == method and router.metadata["sampler"] == "ddim"
        schedule = router.to_schedule(router.metadata["threshold"])
        assert schedule.cache_usage == router.metadata["achieved_cur"]
        schedule.check_compatible(num_blocks=len(dit.transformer_blocks), model_class="DiTTransformer2DModel",
                                  block_width=dit.config.num_attention_heads * dit.config.attention_head_dim,
                                  num_steps=20)
        # Trained for exactly the bundled weights (the export records their step).
        assert router.metadata["dit_training_step"] == trained_step
    with pytest.raises(FileNotFoundError, match=r"no bundled router for method='harmonica', sampler='ddim', steps=7"):
        load_router("harmonica", "ddim", 7)


def test_the_best_bundled_router_of_each_sampler_and_steps_is_bundled_and_forecasts():
    from harmonica.testbed.routers import BEST_ROUTERS, available, load_router

    for (sampler, steps), name in BEST_ROUTERS.items():
        assert (name, sampler, steps) in available()
        router = load_router(name, sampler, steps)
        assert router.num_steps == steps and router.forecast_order == 2
