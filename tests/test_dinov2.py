"""DINOv2 (``Dinov2ForImageClassification``), a family of the adapter table: ViT's layout with two layer
scales per layer, a width given as ``mlp_ratio`` (an int in transformers 5: hidden x 2 = 64 neurons here),
and a classifier on the class token concatenated with the mean of the patch tokens. A tiny model built
from a config goes through the cost model, masking and slicing, pruning, evaluation and export; its
SwiGLU variant is refused at the door."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from conftest import (DINOV2_WIDTH, HIDDEN, IMAGE, PATCH, build_tiny_model, make_batches, save_tiny_dinov2,
                      tiny_config)
from kcm_core import cli, count_params, model_shape, relative_flops, slice_model
from kcm_core.arch import family_for_config, family_for_model, ffn_blocks, transformer_layers
from kcm_core.export import load_pruned, save_pruned
from kcm_core.flops import cost_report, estimate_layer_params, layer_costs
from kcm_core.models import load_model
from kcm_core.pipeline import resolve_seq_len
from kcm_core.plan import KeepPlan, LayerKeep
from kcm_core.realise import mask_copy

CLASSES = ("cat", "dog", "fish")
TOKENS = (IMAGE // PATCH) ** 2 + 1


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(pixel_values=b["pixel_values"]).logits for b in batches])


def _mixed_plan(seed=0) -> KeepPlan:
    """Layer 0 emptied, layer 1 keeps 23 random neurons with scales, layer 2 keeps 50."""
    gen = torch.Generator().manual_seed(seed)
    layers = [LayerKeep((), DINOV2_WIDTH)]
    for kept in (23, 50):
        keep = tuple(sorted(torch.randperm(DINOV2_WIDTH, generator=gen)[:kept].tolist()))
        layers.append(LayerKeep(keep, DINOV2_WIDTH, tuple(0.5 + 0.05 * j for j in range(kept))))
    return KeepPlan(tuple(layers))


def _layer_flops(model, pixels) -> list[int]:
    prefix, layers = transformer_layers(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixels)
    counts = counter.get_flop_counts()
    return [sum(counts.get(f"{type(model).__name__}.{prefix}.{i}", {}).values()) for i in range(len(layers))]


# --------------------------------------------------------------------------- the table row

def test_the_table_row_reads_width_from_mlp_ratio_and_the_head_reads_two_vectors():
    model = build_tiny_model("dinov2", layers=3)
    assert family_for_model(model).name == "dinov2"
    assert [b.width for b in ffn_blocks(model)] == [DINOV2_WIDTH] * 3
    assert ffn_blocks(model)[1].up_name == "dinov2.encoder.layer.1.mlp.fc1"
    assert tuple(ffn_blocks(model)[0].down_rows().shape) == (DINOV2_WIDTH, HIDDEN)
    shape = model_shape(model.config)
    assert shape.vision and shape.image_tokens == TOKENS and shape.ffn_width == (DINOV2_WIDTH,) * 3
    assert model_shape(T.Dinov2Config()).ffn_width[0] == 4 * 768         # the stock default: mlp_ratio 4
    assert [b.width for b in ffn_blocks(build_tiny_model("dinov2", "base", layers=2))] == [DINOV2_WIDTH] * 2
    # the classifier reads 2 x hidden: the cost report's head is what the model holds
    model.config.architectures = ["Dinov2ForImageClassification"]             # as save_pretrained records
    report = cost_report(model_shape(model.config), TOKENS, params=count_params(model))
    assert model.classifier.in_features == 2 * HIDDEN
    assert report.head_macs == 2 * HIDDEN * 2 and report.head_params == 2 * HIDDEN * 2 + 2


def test_swiglu_dinov2_is_refused_naming_the_switch_and_what_is_supported(tmp_path, capsys):
    config = tiny_config("dinov2", use_swiglu_ffn=True)
    with pytest.raises(ValueError, match=r"Dinov2Config with use_swiglu_ffn=True.*only the plain MLP "
                                         r"\(use_swiglu_ffn=False, fc1/fc2\) is supported"):
        family_for_config(config)
    model = T.Dinov2ForImageClassification(config)
    with pytest.raises(ValueError, match=r"^Dinov2ForImageClassification: Unsupported Dinov2Config with "
                                         r"use_swiglu_ffn=True"):
        ffn_blocks(model)
    model.save_pretrained(tmp_path / "swiglu")
    assert cli.main(["flops", "--model", str(tmp_path / "swiglu")]) == 2
    assert "use_swiglu_ffn=True" in capsys.readouterr().err


# --------------------------------------------------------------------------- cost, masking, slicing

def test_masked_equals_sliced_in_logits_and_the_cost_model_matches_the_flop_counter():
    model = build_tiny_model("dinov2", layers=3, attn="eager")
    pixels = make_batches(model, n_batches=1, labels=False)[0]["pixel_values"][:1]       # one image: TOKENS tokens
    shape = model_shape(model.config)
    plan = _mixed_plan()
    masked, sliced = mask_copy(model, plan), slice_model(model, plan)
    assert [b.width for b in ffn_blocks(sliced)] == [0, 23, 50]
    assert (_logits(masked, [{"pixel_values": pixels}]) - _logits(sliced, [{"pixel_values": pixels}])).abs().max() <= 1e-5
    dense, pruned = _layer_flops(model, pixels), _layer_flops(sliced, pixels)
    assert dense == [pytest.approx(2 * row.total, rel=1e-12) for row in layer_costs(shape, TOKENS)]
    assert pruned == [pytest.approx(2 * row.total, rel=1e-12) for row in layer_costs(shape, TOKENS, [0, 23, 50])]
    assert relative_flops(shape, TOKENS, [0, 23, 50]) == pytest.approx(sum(pruned) / sum(dense))
    assert model_shape(sliced.config).ffn_width == (0, 23, 50)
    assert sliced.config.mlp_ratio == 2 and sliced.config.kcm_ffn_widths == [0, 23, 50]
    # parameters: the estimate counts the two layer scales; each neuron holds 2 x hidden + 1
    counted, after = count_params(model), count_params(sliced)
    assert list(counted.layers) == [estimate_layer_params(shape, DINOV2_WIDTH)] * 3
    assert [a - b for a, b in zip(counted.layers, after.layers)] == [
        (DINOV2_WIDTH - k) * (2 * HIDDEN + 1) for k in (0, 23, 50)]


def test_the_sequence_length_is_that_of_the_images_fed_not_the_configs_image_size():
    """DINOv2 interpolates its position grid, so its processor may crop another size than the config's
    image_size (the hub's configs say 518 px, their processors 224 px): the FLOPs model counts the tokens
    the model runs on, measured here by the FLOP counter on 8 x 12 px images (2 x 3 patches + 1)."""
    model = build_tiny_model("dinov2", layers=2, attn="eager")
    shape = model_shape(model.config)
    small = [{"pixel_values": torch.randn(1, 3, 8, 12, generator=torch.Generator().manual_seed(0))}]
    assert resolve_seq_len(shape, small, None) == 7.0
    assert resolve_seq_len(shape, make_batches(model, labels=False), None) == TOKENS
    assert resolve_seq_len(shape, [], None) == TOKENS                     # no images: the config's size
    measured = _layer_flops(model, small[0]["pixel_values"])
    assert measured == [pytest.approx(2 * row.total, rel=1e-12) for row in layer_costs(shape, 7)]


def test_a_uniform_width_that_mlp_ratio_states_loads_with_the_stock_class(tmp_path):
    """32 neurons per layer is mlp_ratio 1: the export is a stock Dinov2ForImageClassification folder."""
    model = build_tiny_model("dinov2", layers=3)
    batches = make_batches(model, labels=False, n_batches=2)
    plan = KeepPlan.from_masks([torch.arange(DINOV2_WIDTH) % 2 == 1] * 3)             # 32 each
    sliced = slice_model(model, plan)
    assert sliced.config.mlp_ratio == 1 and not hasattr(sliced.config, "kcm_ffn_widths")
    result = save_pruned(sliced, tmp_path / "out", plan=plan, verify=False)    # reloaded here instead
    assert result.loader == "transformers"
    stock = T.Dinov2ForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert [layer.mlp.fc1.out_features for layer in stock.dinov2.encoder.layer] == [32] * 3
    assert (_logits(stock, batches) - _logits(sliced, batches)).abs().max() <= 1e-5


def test_a_width_mlp_ratio_cannot_state_is_recorded_for_load_pruned(tmp_path):
    """35 neurons per layer: transformers 5's Dinov2Config takes mlp_ratio as an int (multiples of the
    hidden size only), so the config says mlp_ratio 2 plus kcm_ffn_widths, and load_pruned slices to it."""
    with pytest.raises(Exception, match="mlp_ratio"):
        T.Dinov2Config(mlp_ratio=35 / 32)
    model = build_tiny_model("dinov2", layers=3)
    batches = make_batches(model, labels=False, n_batches=2)
    plan = KeepPlan.from_masks([torch.arange(DINOV2_WIDTH) < 35] * 3)
    sliced = slice_model(model, plan)
    result = save_pruned(sliced, tmp_path / "out", plan=plan, verify=False)    # reloaded here instead
    assert result.loader == "kcm_core.load_pruned"
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["mlp_ratio"] == 2 and written["kcm_ffn_widths"] == [35] * 3
    assert "integer `mlp_ratio`" in (tmp_path / "out" / "report.md").read_text()
    reloaded = load_pruned(tmp_path / "out")
    assert (_logits(reloaded, batches) - _logits(sliced, batches)).abs().max() <= 1e-5


# --------------------------------------------------------------------------- the command line on images

@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A 3-class tiny DINOv2 with a BitImageProcessor built from a dict (the class DINOv2 checkpoints use)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "model", CLASSES)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "folder"
    rng = np.random.default_rng(1)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _accuracy_by_hand(model_dir: Path, folder: Path) -> float:
    """Accuracy of the stock forward (class token + patch mean) on the folder, with the saved processor."""
    model, _ = load_model(model_dir)
    processor = T.AutoImageProcessor.from_pretrained(model_dir)
    right = total = 0
    for index, c in enumerate(CLASSES):
        images = [Image.open(p).convert("RGB") for p in sorted((folder / c).glob("*.png"))]
        with torch.no_grad():
            logits = model(**processor(images=images, return_tensors="pt")).logits
        right += int((logits.argmax(-1) == index).sum())
        total += len(images)
    return right / total


@pytest.mark.slow               # three CLI runs, two exports verified in a fresh process: about a minute
def test_prune_evaluate_export_of_a_dinov2_on_an_image_folder(tmp_path, capsys, dinov2_dir, image_folder):
    out = tmp_path / "pruned"
    code, stdout, err = _run(capsys, "prune", "--model", dinov2_dir, "--data", image_folder, "--flops", 0.8,
                             "--uniform", "--out", out, "--batch-size", 8, "--format", "hf,onnx")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["evaluation"]["examples"] == 24
    plan = KeepPlan.from_json((out / "kcm_plan.json").read_text())
    assert len(set(plan.kept_counts)) == 1 and plan.kept_counts[0] < DINOV2_WIDTH
    # the report's numbers are those of the stock forward on the processor's pixels
    assert report["evaluation"]["before"]["accuracy"]["value"] == pytest.approx(_accuracy_by_hand(dinov2_dir, image_folder))
    assert report["evaluation"]["after"]["accuracy"]["value"] == pytest.approx(_accuracy_by_hand(out, image_folder))
    code, stdout, err = _run(capsys, "evaluate", "--model", out, "--data", image_folder)
    assert code == 0, err
    assert json.loads(stdout)["accuracy"]["value"] == pytest.approx(report["evaluation"]["after"]["accuracy"]["value"])
    code, stdout, err = _run(capsys, "export", "--model", out, "--out", tmp_path / "again")
    assert code == 0, err
    first, again = load_model(out)[0], load_model(tmp_path / "again")[0]
    batches = make_batches(first, labels=False, n_batches=1)
    assert (_logits(first, batches) - _logits(again, batches)).abs().max() <= 1e-5
    import onnxruntime as ort                  # the ONNX file reads the same pixels to the same logits
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"pixel_values": batches[0]["pixel_values"].numpy()})[0]
    assert np.abs(onnx_logits - _logits(first, batches).numpy()).max() < 1e-4
