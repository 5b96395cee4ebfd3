"""The app on an image classifier: a tiny ViT built from a config and a folder of images made here, through
the entry point (``AppTest``); the real vision demo and the network are never touched."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers as T
from PIL import Image

from conftest import app_runner, build_tiny_model
from kcm_app import live, sources
from kcm_app.testing import finish_background

PAGES = ["pages/1_model.py", "pages/2_cost.py", "pages/3_scores.py", "pages/4_hull.py",
         "pages/5_prune.py", "pages/6_export.py"]
TIMEOUT = 120
CLASSES = ("boot", "coat", "shirt")


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    """A tiny ViT (3 classes) with its image processor, and 3 class folders of 40 greyscale images."""
    root = tmp_path_factory.mktemp("tiny-vision")
    model = build_tiny_model("vit", num_labels=3, id2label=dict(enumerate(CLASSES)),
                             label2id={c: i for i, c in enumerate(CLASSES)})
    model.save_pretrained(root / "model")
    T.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 80, (14, 14)) + 80 * k
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(root / "images" / name / f"{i}.png")
    return root / "model", root / "images"


@pytest.fixture
def app(tiny_vision, monkeypatch, tmp_path):
    model_dir, images = tiny_vision
    # the disk cache in the test's folder, never the user's; AppTest fires no timers, so a run waits
    for name, value in {"KCM_APP_MODEL": model_dir, "KCM_APP_DATA": images, "KCM_CACHE_DIR": tmp_path / "cache"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(live, "FIRST_WAIT_S", TIMEOUT)
    yield app_runner(TIMEOUT)
    finish_background(stop=True)


def test_the_vision_demo_is_offered_and_named_by_the_environment():
    assert "demo-vision" in sources.MODEL_KINDS and "demo-vision" in sources.DATA_KINDS
    model, data = sources.env_defaults({"KCM_APP_MODEL": "demo-vision"})
    assert (model.kind, data.kind) == ("demo-vision", "demo-vision")


def test_every_page_runs_on_an_image_classifier(app):
    at = app()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    accuracy = [m.value for m in at.metric if m.label == "Accuracy (unpruned)"]
    assert accuracy and accuracy[0].endswith("%")
    for page in PAGES[1:]:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])


def test_cost_page_times_the_vit_blocks_on_images(app):
    at = app("pages/2_cost.py")
    at.button(key="cost_measure").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Measured time per block, batch" in c.proto.spec for c in at.get("plotly_chart"))


def test_prune_page_shows_test_images_with_both_predictions(app):
    at = app("pages/5_prune.py")
    assert any(s.value == "Test images: unpruned vs pruned prediction" for s in at.subheader)
    captions = [c.value for c in at.caption]
    assert any("pruned model changes its prediction on" in c for c in captions), captions
    assert sum("unpruned: " in c and "pruned: " in c for c in captions) == 24


def test_model_page_shows_sample_images_with_labels(app):
    at = app()
    assert any("Test images as the model reads them" in c.value for c in at.caption)
    assert sum(c.value in ("boot", "coat", "shirt") for c in at.caption) == 8
    # the image default and why, with the measured chart when the results file is there
    assert any("For an image classifier the default is not the paper's KCM" in i.value for i in at.info)


def test_an_image_model_opens_on_its_own_default_method(app):
    from kcm_core.methods import DEFAULT_METHOD, DEFAULT_VISION_METHOD
    at = app("pages/5_prune.py")
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["method"] == DEFAULT_VISION_METHOD != DEFAULT_METHOD
