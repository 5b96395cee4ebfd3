"""Image data (``kcm_core.images``) and image classifiers through the CLI: a tiny ViT built from a config
is pruned, evaluated, exported and reloaded with the stock class, on an image folder made here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny_model  # noqa: E402

from kcm_core import cli  # noqa: E402
from kcm_core.data import labels_for_model  # noqa: E402
from kcm_core.images import ImageData, image_batches, load_image_data  # noqa: E402
from kcm_core.methods import DEFAULT_METHOD, DEFAULT_VISION_METHOD  # noqa: E402

CLASSES = ("cat", "dog", "fish")


def _image(rng, mode: str) -> Image.Image:
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (20, 18), dtype=np.uint8), mode="L")
    return Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit") / "model"
    model = build_tiny_model("vit", num_labels=3, id2label=dict(enumerate(CLASSES)),
                             label2id={c: i for i, c in enumerate(CLASSES)})
    model.save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three class folders of 8 images each: RGB, and every fourth one greyscale; plus a README."""
    root = tmp_path_factory.mktemp("images") / "folder"
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(8):
            _image(rng, "L" if i % 4 == 0 else "RGB").save(root / c / f"{i}.png")
    (root / "cat" / "README.txt").write_text("not an image")
    return root


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- reading

def test_image_folder_layout_gives_labels_by_class_folder(image_folder):
    data = load_image_data(image_folder)
    assert isinstance(data, ImageData) and len(data) == 24
    assert data.label_names == CLASSES and data.labels == tuple(np.repeat([0, 1, 2], 8))
    assert data.paths[0].endswith("cat/0.png")
    assert "skipped 1 files that are not images" in data.source     # the README, counted, not silent


def test_unlabeled_folder_and_table_with_relative_paths(tmp_path, image_folder):
    rng = np.random.default_rng(1)
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(3):
        _image(rng, "RGB").save(loose / f"{i}.jpg")
    data = load_image_data(loose)
    assert len(data) == 3 and data.labels is None and "unlabeled" in data.source
    table = tmp_path / "list.csv"
    table.write_text("path,label\n" + "".join(f"{image_folder}/dog/{i}.png,dog\n" for i in range(2))
                     + "loose/0.jpg,fish\n")
    data = load_image_data(table)
    assert data.labels == (0, 0, 1) and data.label_names == ("dog", "fish")
    assert data.paths[2] == str(tmp_path / "loose" / "0.jpg")


@pytest.mark.parametrize("layout, message", [
    ("empty", "holds no images"),
    ("empty-class", "class folder .*bird holds no images"),
    ("mixed", "both class sub-folders"),
    ("missing-row", r"list.csv, row 2: image file .*nope.png does not exist"),
    ("no-column", "has no image-path column"),
])
def test_bad_layouts_are_refused_naming_the_place(tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(2)
    source = root
    if layout == "empty-class":
        (root / "bird").mkdir()
        (root / "cat").mkdir()
        _image(rng, "RGB").save(root / "cat" / "a.png")
    elif layout == "mixed":
        (root / "cat").mkdir()
        _image(rng, "RGB").save(root / "cat" / "a.png")
        _image(rng, "RGB").save(root / "b.png")
    elif layout == "missing-row":
        _image(rng, "RGB").save(root / "a.png")
        source = root / "list.csv"
        source.write_text("image,label\na.png,cat\nnope.png,dog\n")
    elif layout == "no-column":
        source = root / "list.csv"
        source.write_text("picture,label\na.png,cat\n")
    with pytest.raises(ValueError, match=message):
        load_image_data(source)


def test_corrupt_and_fake_images_are_named_when_read(tmp_path, vit_dir):
    from kcm_core.models import load_model
    model, processor = load_model(str(vit_dir), device="cpu")
    for name, payload in (("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40), ("text.jpg", b"hello")):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=rf"{name} is not a readable image"):
            image_batches(ImageData(texts=(str(path),)), processor, model.config)


def test_greyscale_images_are_converted_for_an_rgb_model_and_it_says_so(image_folder, vit_dir):
    from kcm_core.models import load_model
    model, processor = load_model(str(vit_dir), device="cpu")
    data = labels_for_model(load_image_data(image_folder), model.config)
    said = []
    batches = image_batches(data, processor, model.config, batch_size=10, progress=lambda m, f: said.append(m))
    assert [b["pixel_values"].shape for b in batches] == [(10, 3, 16, 16), (10, 3, 16, 16), (4, 3, 16, 16)]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.tensor(data.labels))
    assert said == ["images: converted 6 images to RGB for this model (6 L)"]


def test_a_class_the_model_cannot_predict_is_refused_by_name(tmp_path, vit_dir):
    from kcm_core.models import load_model
    model, _ = load_model(str(vit_dir), device="cpu")
    (tmp_path / "zebra").mkdir()
    _image(np.random.default_rng(3), "RGB").save(tmp_path / "zebra" / "z.png")
    with pytest.raises(ValueError, match="zebra"):
        labels_for_model(load_image_data(tmp_path), model.config)


# --------------------------------------------------------------------------- CLI

def test_prune_evaluate_export_and_stock_reload_of_a_vit(export_reload, tmp_path, capsys, vit_dir, image_folder):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "prune", "--model", vit_dir, "--data", image_folder, "--flops", 0.8,
                                "--uniform", "--out", out, "--batch-size", 8, "--format", "hf,onnx")
    assert code == 0, err
    report = json.loads(stdout)
    # an image classifier's default (not the text classifiers' kcm), recorded as the default
    assert report["method"]["name"] == DEFAULT_VISION_METHOD != DEFAULT_METHOD and report["method"]["default"]
    evaluation = report["evaluation"]
    assert evaluation["examples"] == 24
    assert set(evaluation["after"]) == {"accuracy", "agreement"} and "accuracy" in evaluation["before"]
    assert "accuracy_difference" in evaluation["paired"]
    assert "converted 6 images to RGB" in err
    assert report["data"]["unit"] == "images" and report["data"]["samples"] == 24
    from kcm_core.report import render_markdown
    assert "(24 unlabeled images, seed 0)" in render_markdown(report)
    code, stdout, err = run_cli(capsys, "evaluate", "--model", out, "--data", image_folder)
    assert code == 0, err
    assert json.loads(stdout)["accuracy"]["value"] == pytest.approx(evaluation["after"]["accuracy"]["value"])
    stock = T.ViTForImageClassification.from_pretrained(out).eval()
    processor = T.AutoImageProcessor.from_pretrained(out)
    widths = [layer.mlp.fc1.out_features if hasattr(layer, "mlp") else layer.intermediate.dense.out_features
              for layer in (stock.vit.layers if hasattr(stock.vit, "layers") else stock.vit.encoder.layer)]
    assert len(set(widths)) == 1 and widths[0] < 37
    pixels = processor(images=[Image.open(image_folder / "dog" / "1.png")], return_tensors="pt")["pixel_values"]
    from kcm_core.models import load_model
    ours, _ = load_model(str(out), device="cpu")
    with torch.no_grad():
        logits = stock(pixel_values=pixels).logits
        assert torch.allclose(logits, ours(pixel_values=pixels).logits, atol=1e-5)
    import onnxruntime as ort                  # the ONNX export reads the same pixels to the same logits
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"pixel_values": pixels.numpy()})[0]
    assert np.abs(onnx_logits - logits.numpy()).max() < 1e-4



@pytest.mark.slow           # two CLI runs, each exported and verified in a fresh process: about 25 s
def test_streamed_prune_of_a_vit_writes_the_in_memory_plan(tmp_path, capsys, vit_dir, image_folder):
    """--stream on a ViT folder (whose tensors transformers 5 renames on load) reads the same images and
    writes the plan and the model of the in-memory run."""
    common = ["prune", "--model", vit_dir, "--data", image_folder, "--flops", 0.8, "--batch-size", 8]
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "memory")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, *common, "--out", tmp_path / "streamed", "--stream")
    assert code == 0, err
    assert "converted 6 images to RGB" in err
    report = json.loads(stdout)
    assert report["export"]["streamed"] is True and "not evaluated" in report["evaluation_note"]
    plans = [json.loads((tmp_path / name / "kcm_plan.json").read_text()) for name in ("memory", "streamed")]
    assert [l["keep_idx"] for l in plans[0]["layers"]] == [l["keep_idx"] for l in plans[1]["layers"]]
    assert any(len(l["keep_idx"]) < 37 for l in plans[1]["layers"])
    from kcm_core.models import load_model
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    memory, streamed = load_model(tmp_path / "memory")[0], load_model(tmp_path / "streamed")[0]
    with torch.no_grad():
        assert (memory(pixel_values=pixels).logits - streamed(pixel_values=pixels).logits).abs().max() <= 1e-5


# --------------------------------------------------------------------------- Hugging Face image datasets

def _hf_dataset(names, labels, seed=4, corrupt_row=None):
    """A ``datasets.Dataset`` built in memory: a ``datasets.Image`` column of RGB images (``corrupt_row``:
    that row's bytes are not an image) and a ``ClassLabel`` column with ``names``."""
    import datasets
    rng = np.random.default_rng(seed)
    images = []
    for i in range(len(labels)):
        buffer = __import__("io").BytesIO()
        _image(rng, "RGB").save(buffer, format="PNG")
        images.append({"bytes": b"not a png at all" if i == corrupt_row else buffer.getvalue(), "path": None})
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"picture": images, "label": list(labels)}, features=features)


def test_a_saved_hf_dataset_maps_its_class_names_to_the_model_and_runs_through_the_cli(tmp_path, capsys, vit_dir):
    from kcm_core.models import load_model
    # ClassLabel order differs from the model's ids: names, not positions, decide
    folder = tmp_path / "saved"
    _hf_dataset(("fish", "cat", "dog"), [0, 1, 2, 1, 0, 2, 2, 1, 0]).save_to_disk(str(folder))
    data = load_image_data(folder)
    assert isinstance(data, ImageData) and len(data) == 9 and len(data.images) == 9
    assert data.label_names == ("fish", "cat", "dog") and data.texts[3] == f"{folder} row 3"
    model, processor = load_model(str(vit_dir), device="cpu")
    mapped = labels_for_model(data, model.config)
    assert mapped.labels == (2, 0, 1, 0, 2, 1, 1, 0, 2)        # fish=2, cat=0, dog=1 in the model
    sub = mapped.sample(4, seed=0)
    batches = image_batches(sub, processor, model.config, batch_size=3)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert torch.cat([b["labels"] for b in batches]).tolist() == list(sub.labels)
    # the same image decoded from the saved bytes and from a PNG file gives the same pixels
    png = tmp_path / "row0.png"
    png.write_bytes(data.images[0])
    from_file = image_batches(ImageData(texts=(str(png),)), processor, model.config, with_labels=False)
    assert torch.equal(from_file[0]["pixel_values"], image_batches(data.subset([0]), processor, model.config,
                                                                   with_labels=False)[0]["pixel_values"])
    code, stdout, err = run_cli(capsys, "evaluate", "--model", vit_dir, "--data", folder)
    assert code == 0, err
    assert json.loads(stdout)["examples"] == 9


def test_a_saved_dataset_dict_needs_a_split_and_names_its_splits(tmp_path, capsys, vit_dir):
    import datasets
    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": _hf_dataset(CLASSES, [0, 1, 2, 0]),
                          "test": _hf_dataset(CLASSES, [2, 1], seed=5)}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match="holds the splits train, test; choose one"):
        load_image_data(folder)
    with pytest.raises(ValueError, match="there is no split 'validation'"):
        load_image_data(folder, split="validation")
    assert load_image_data(folder, split="test").labels == (2, 1)
    code, stdout, err = run_cli(capsys, "evaluate", "--model", vit_dir, "--data", folder, "--split", "test")
    assert code == 0, err
    assert json.loads(stdout)["examples"] == 2


def test_a_hf_dataset_without_an_image_column_lists_its_columns(tmp_path):
    import datasets
    folder = tmp_path / "text"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"has no image column .*columns: text \(string\), label \(int64\)"):
        load_image_data(folder)
    with pytest.raises(ValueError, match=r"has no column 'photo' \(columns: text, label\)"):
        load_image_data(folder, image_column="photo")


def test_a_hf_class_the_model_cannot_predict_is_refused_by_name(tmp_path, vit_dir):
    from kcm_core.models import load_model
    model, _ = load_model(str(vit_dir), device="cpu")
    folder = tmp_path / "zoo"
    _hf_dataset(("cat", "zebra"), [0, 1, 1]).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"label 'zebra' is not one of the model's 3 classes"):
        labels_for_model(load_image_data(folder), model.config)


def test_a_corrupt_image_in_a_hf_dataset_is_named_by_row(tmp_path, vit_dir):
    from kcm_core.models import load_model
    model, processor = load_model(str(vit_dir), device="cpu")
    folder = tmp_path / "bad"
    _hf_dataset(CLASSES, [0, 1, 2], corrupt_row=2).save_to_disk(str(folder))
    data = labels_for_model(load_image_data(folder), model.config)
    with pytest.raises(ValueError, match=rf"{folder} row 2 is not a readable image"):
        image_batches(data, processor, model.config)


def test_pil_images_without_labels_and_a_hub_name_go_through_load_dataset(monkeypatch):
    """A hub name (no such local path) is read with ``datasets.load_dataset`` at the given split and
    config; here ``hub_dataset`` is replaced, so no network is touched: the real hub path is not tested."""
    import datasets

    from kcm_core.data import readers
    rng = np.random.default_rng(6)
    dataset = datasets.Dataset.from_dict({"img": [_image(rng, "L") for _ in range(3)]})
    asked = []

    def fake_hub(name, config_name=None, split=None):
        asked.append((name, config_name, split))
        return dataset, f"hub:{name} [{split}]"

    monkeypatch.setattr(readers, "hub_dataset", fake_hub)
    data = load_image_data("beans", split="train")
    assert asked == [("beans", None, "train")]
    assert data.labels is None and len(data.images) == 3 and data.source == "hub:beans [train] (3 images, unlabeled)"
    assert data.texts[1] == "hub:beans [train] row 1"


def test_the_text_demo_as_data_for_an_image_model_is_refused_without_a_hub_lookup(tmp_path, capsys, vit_dir,
                                                                                  monkeypatch):
    from kcm_core.data import readers
    monkeypatch.setattr(readers, "hub_dataset", lambda *a, **k: pytest.fail("looked up on the hub"))
    code, _, err = run_cli(capsys, "evaluate", "--model", vit_dir, "--data", "demo")
    assert code == 2 and "'demo' holds text, but an image model reads images" in err
