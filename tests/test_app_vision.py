"""The app on an image classifier: a tiny ViT built from a config and a folder of images made here, through
the entry point (``AppTest``); the real vision demo and the network are never touched."""
from __future__ import annotations

import io
import re
import stat
import zipfile
from typing import Sequence

import numpy as np
import pytest
import transformers as T
from PIL import Image

from conftest import app_runner, build_tiny_model, save_tiny_dinov2
from kcm_app import image_uploads, live, sources
from kcm_core.images import load_image_data
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


# Text-model wording where an image model's inputs are meant (a ViT reads images of patches + 1 tokens)
TEXT_WORDING = re.compile(r"(?i)\bsequences?\b|\bsentences?\b|tokens of text|\btexts\b|text column|"
                          r"max(imum)? length")


def page_words(at) -> list[str]:
    """Every string a page shows (values, labels, help, chart specs), sidebar included."""
    found = []

    def walk(node):
        for attr in ("value", "label", "help", "body", "placeholder"):
            value = getattr(node, attr, None)
            if isinstance(value, str):
                found.append(value)
        spec = getattr(getattr(node, "proto", None), "spec", None)
        if isinstance(spec, str):
            found.append(spec)
        for child in (getattr(node, "children", None) or {}).values():
            walk(child)

    walk(at._tree)
    return found


@pytest.mark.slow            # about 13 s, then about 35 s for its background work to stop, on two shared cores
def test_every_page_runs_on_an_image_classifier_and_speaks_of_images(app):
    at = app()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    accuracy = [m.value for m in at.metric if m.label == "Accuracy (unpruned)"]
    assert accuracy and accuracy[0].endswith("%")
    assert [n.label for n in at.sidebar.number_input][0] == "Unlabeled images"
    for page in PAGES:
        if page != PAGES[0]:
            at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
        wording = [m.group(0) + ": " + text[max(0, m.start() - 60):m.end() + 60]
                   for text in page_words(at) for m in TEXT_WORDING.finditer(text)]
        assert not wording, (page, wording)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A 3-class tiny DINOv2 with the BitImageProcessor its checkpoints ship (resize, centre crop)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "model", CLASSES)


def test_every_page_runs_on_a_dinov2_and_the_prune_page_prunes_it(tiny_dinov2, tiny_vision, monkeypatch, tmp_path):
    for name, value in {"KCM_APP_MODEL": tiny_dinov2, "KCM_APP_DATA": tiny_vision[1],
                        "KCM_CACHE_DIR": tmp_path / "cache"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(live, "FIRST_WAIT_S", TIMEOUT)
    try:
        at = app_runner(TIMEOUT)()
        assert "Dinov2ForImageClassification" in " ".join(str(t.value.to_dict()) for t in at.table)
        for page in PAGES:
            if page != PAGES[0]:
                at.switch_page(page).run()
            assert not at.exception, (page, [e.value for e in at.exception])
            assert not at.error, (page, [e.value for e in at.error])
            if page == "pages/5_prune.py":
                flops = [m.value for m in at.metric if m.label == "Relative FLOPs"]
                assert flops and float(flops[0].rstrip("%")) < 100, flops
                accuracy = [m.value for m in at.metric if m.label == "Accuracy"]
                assert accuracy and accuracy[0].endswith("%"), [m.label for m in at.metric]
    finally:
        finish_background(stop=True)


def test_cost_page_counts_the_vit_blocks_at_patches_plus_one_and_times_them_on_images(app):
    at = app("pages/2_cost.py")
    # the tiny ViT reads 16 x 16 images in 4 x 4 patches: 16 patches + the class token
    assert any("Tokens per image s = (16/4)^2 + 1 = 17" in m.value for m in at.markdown)
    assert any("s = (16/4)^2 + 1 = 17 tokens per image" in c.value for c in at.caption)
    assert not [s for s in at.select_slider if s.key == "cost_seq_len"]      # nothing to choose for images
    assert [m.label for m in at.metric][0] == "Encoder cost per image"
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("Cost per layer at s = 17 tokens" in s for s in specs)
    assert any("tokens per image s (patches + 1)" in s for s in specs)
    at.button(key="cost_measure").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Measured time per block, batch 16 images x 17 tokens" in c.proto.spec
               for c in at.get("plotly_chart"))


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


# --------------------------------------------------------------------------- image uploads

def _png(value: int, size=(14, 14)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size, value, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes], links: Sequence[str] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _image_folder_zip(root: str = "clothes/") -> bytes:
    members = {f"{root}{name}/{i}.png": _png(60 * k + i) for k, name in enumerate(CLASSES) for i in range(30)}
    members.update({"__MACOSX/._x": b"junk", f"{root}.DS_Store": b"junk", f"{root}boot/notes.txt": b"hi"})
    return _zip(members)


def test_a_zip_of_an_image_folder_is_extracted_once_per_session_and_reads_as_labeled_images(tmp_path):
    upload = _image_folder_zip()
    folder = image_uploads.image_upload_folder([("clothes.zip", upload)], tmp_path, "session-a")
    assert folder.name == "images" and folder.parent.parent == tmp_path
    assert sorted(p.name for p in folder.iterdir()) == list(CLASSES)      # the top folder unwrapped
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    data = load_image_data(folder)
    assert len(data) == 90 and data.label_names == CLASSES and "skipped 1 files" in data.source
    again = image_uploads.image_upload_folder([("clothes.zip", upload)], tmp_path, "session-a")
    other = image_uploads.image_upload_folder([("clothes.zip", upload)], tmp_path, "session-b")
    assert again == folder and other != folder                 # one folder per session, written once
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".part")]


def test_single_images_are_unlabeled_and_keep_both_of_two_alike_names(tmp_path):
    folder = image_uploads.image_upload_folder([("a.png", _png(1)), ("sub/a.png", _png(2)), ("b.jpg", _png(3))],
                                               tmp_path, "s")
    assert sorted(p.name for p in folder.iterdir()) == ["a-2.png", "a.png", "b.jpg"]
    data = load_image_data(folder)
    assert len(data) == 3 and data.labels is None


@pytest.mark.parametrize("files, message", [
    ([("evil.zip", _zip({"../outside.png": _png(1)}))], r"evil.zip: member '../outside.png' points outside"),
    ([("evil.zip", _zip({"/etc/x.png": _png(1)}))], r"member '/etc/x.png' points outside"),
    ([("evil.zip", _zip({"a/1.png": _png(1)}, links=["a/link.png"]))], r"member 'a/link.png' is a link"),
    ([("bad.zip", _zip({"cat/1.png": _png(1), "cat/2.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}))],
     r"bad.zip: cat/2.png is not a readable image"),
    ([("notes.zip", _zip({"readme.txt": b"hi"}))], r"notes.zip holds no images"),
    ([("fake.zip", b"not a zip")], r"fake.zip is not a readable zip archive"),
    ([("a.zip", _zip({"x/1.png": _png(1)})), ("b.png", _png(2))], r"upload one zip \(a.zip\) on its own"),
    ([("photo.png", b"hello")], r"photo.png is not a readable image"),
    ([("table.csv", b"a,b")], r"table.csv is not an image file"),
], ids=["dot-dot", "absolute", "link", "corrupt-image", "no-images", "not-a-zip", "zip-and-image",
        "corrupt-single", "not-an-image"])
def test_bad_uploads_are_refused_naming_the_file_and_leave_nothing(tmp_path, files, message):
    with pytest.raises(ValueError, match=message):
        image_uploads.image_upload_folder(files, tmp_path / "uploads", "s")
    assert not (tmp_path / "outside.png").exists()
    assert not list((tmp_path / "uploads").rglob("*.png"))        # nothing half-extracted stays


def test_a_zip_larger_than_the_limit_or_a_damaged_member_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(image_uploads, "MAX_BYTES", 1000)
    with pytest.raises(ValueError, match="big.zip extracts to more than"):
        image_uploads.image_upload_folder([("big.zip", _zip({"a/1.png": _png(1, (200, 200)) + b"\0" * 2000}))],
                                          tmp_path, "s")
    monkeypatch.setattr(image_uploads, "MAX_BYTES", 512 * 2**20)
    content = bytearray(_zip({"cat/1.png": _png(7, (64, 64))}))
    start = content.index(b"cat/1.png") + len("cat/1.png")            # the local header's name, then data
    content[start + 5] ^= 0xFF                                         # flip a byte of the compressed data
    with pytest.raises(ValueError, match=r"damaged.zip: member 'cat/1.png' is damaged"):
        image_uploads.image_upload_folder([("damaged.zip", bytes(content))], tmp_path, "s")


@pytest.mark.slow            # about 65 s on two shared cores: three workspaces and their background work
def test_the_sidebar_takes_a_zip_of_an_image_folder_and_single_images(app):
    at = app()
    at.radio(key="data_kind").set_value("images").run()
    assert not at.exception
    assert any("no images uploaded yet" in e.value for e in at.error)
    at.file_uploader(key="image_upload").set_value(("clothes.zip", _image_folder_zip(), "application/zip")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    ws = at.session_state["workspace"]
    assert "90 images in 3 classes" in ws.info.data_source and ws.info.eval_examples > 0
    assert any(m.label == "Accuracy (unpruned)" and m.value.endswith("%") for m in at.metric)
    # a few single images: unlabeled, a quick look at the pages
    at.file_uploader(key="image_upload").set_value([(f"{i}.png", _png(40 * i), "image/png") for i in range(3)]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "unlabeled images" in at.session_state["workspace"].info.data_source
    for page in PAGES[1:]:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
    # a corrupt image in the zip is named on the page
    bad = _zip({"boot/1.png": _png(1), "boot/2.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40})
    at.switch_page(PAGES[0]).run()
    at.file_uploader(key="image_upload").set_value(("bad.zip", bad, "application/zip")).run()
    assert any("bad.zip: boot/2.png is not a readable image" in e.value for e in at.error), [e.value for e in at.error]


def test_the_app_reads_hf_image_datasets_for_an_image_model(tmp_path, monkeypatch):
    """A ``save_to_disk`` folder ("File on this machine", with its split) and a hub name ("Hub dataset";
    ``hub_dataset`` replaced here, no network) are read as images when the model reads images."""
    import datasets

    from kcm_app import resources
    from kcm_core.data import readers
    from kcm_core.images import ImageData
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["coat", "boot"])})
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": _png(9 * i), "path": None} for i in range(4)],
                                          "label": [0, 1, 1, 0]}, features=features)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
    data = resources.load_data(sources.DataChoice("file", str(tmp_path / "saved"), split="train"), "train", True)
    assert isinstance(data, ImageData) and data.labels == (0, 1, 1, 0) and data.label_names == ("coat", "boot")
    monkeypatch.setattr(readers, "hub_dataset", lambda name, config, split: (dataset, f"hub:{name} [{split}]"))
    data = resources.load_data(sources.DataChoice("hub", "someone/clothes", split="test"), "train", True)
    assert isinstance(data, ImageData) and data.source == "hub:someone/clothes [test] (4 images, 2 classes)"


def test_a_shared_server_takes_only_its_own_image_upload_folders(tmp_path, monkeypatch):
    from kcm_app import resources
    monkeypatch.setenv("KCM_SHARED_SERVER", "1")
    monkeypatch.setenv("KCM_ALLOWED_ROOTS", str(tmp_path))
    with pytest.raises(ValueError, match="that upload is no longer on this server"):
        resources.data_source(sources.DataChoice("images", str(tmp_path)))
    mine = image_uploads.image_upload_folder([("a.png", _png(5))], sources.upload_dir(), "s")
    assert resources.data_source(sources.DataChoice("images", str(mine))) == str(mine)
    monkeypatch.setenv("KCM_ALLOW_UPLOADS", "0")
    with pytest.raises(ValueError, match="uploads are turned off"):
        resources.data_source(sources.DataChoice("images", str(mine)))
