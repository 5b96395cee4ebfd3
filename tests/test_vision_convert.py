"""The ONNX -> transformers converter of the vision demo, on a tiny DINOv2 exported here with torch and run
with onnxruntime: the rebuilt Dinov2Model and the folded plain ViT must compute what the graph computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kcm_core.demos import vision_convert as vc

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Dinov2Model (odd sizes, non-trivial layer scales) exported at 12 x 12 px from a 5 x 5 position
    grid (so the graph interpolates it), and the graph's output on a fixed input."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=3, patch_size=4,
                          image_size=20, layer_norm_eps=1e-6, layerscale_value=0.5)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)     # layer scales and biases away from their init
    pixels = torch.randn(2, 3, 12, 12)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(model, (pixels,), str(path), input_names=["pixel_values"], output_names=["hidden"],
                      dynamo=False, opset_version=14, dynamic_axes={"pixel_values": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(["hidden"], {"pixel_values": pixels.numpy()})[0]
    return path, pixels, reference, model


def test_fields_read_from_the_graph(exported):
    path, _, _, model = exported
    fields, state = vc.dinov2_state_from_onnx(path)
    assert fields == {"hidden_size": 24, "num_hidden_layers": 2, "patch_size": 4, "image_size": 20, "mlp_ratio": 3,
                      "num_channels": 3}
    assert state["embeddings.position_embeddings"].shape == (1, 26, 24)
    assert state["encoder.layer.1.mlp.fc1.weight"].shape == (72, 24)          # (out, in)


def test_rebuilt_dinov2_matches_onnxruntime(exported, tmp_path):
    from transformers import Dinov2Model
    path, pixels, reference, _ = exported
    fields, state = vc.dinov2_state_from_onnx(path)
    rebuilt = Dinov2Model.from_pretrained(vc.write_checkpoint(tmp_path, vc.dinov2_config(fields, 2), state)).eval()
    with torch.no_grad():
        out = rebuilt(pixels).last_hidden_state.numpy()
    assert np.abs(out - reference).max() < 1e-5


def test_folded_vit_matches_onnxruntime_at_the_working_size(exported, tmp_path):
    from transformers import ViTModel
    path, pixels, reference, _ = exported
    fields, state = vc.dinov2_state_from_onnx(path)
    config, vit_state = vc.vit_state_from_dinov2(vc.dinov2_config(fields, 2), state, 12, prefix="")
    assert config.image_size == 12 and config.intermediate_size == 72
    vit = ViTModel.from_pretrained(vc.write_checkpoint(tmp_path, config, vit_state), add_pooling_layer=False).eval()
    with torch.no_grad():
        out = vit(pixels).last_hidden_state.numpy()
    assert np.abs(out - reference).max() < 1e-5
    # The folded layer scales are real: without them the output differs.
    unscaled = dict(state)
    for key in [k for k in state if k.endswith("lambda1")]:
        unscaled[key] = torch.ones_like(state[key])
    config2, plain = vc.vit_state_from_dinov2(vc.dinov2_config(fields, 2), unscaled, 12, prefix="")
    other = ViTModel.from_pretrained(vc.write_checkpoint(tmp_path / "b", config2, plain), add_pooling_layer=False)
    with torch.no_grad():
        assert np.abs(other.eval()(pixels).last_hidden_state.numpy() - reference).max() > 1e-2


def test_refuses_a_graph_without_a_backbone(tmp_path):
    from onnx import TensorProto, helper
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="no DINOv2 backbone"):
        vc.dinov2_state_from_onnx(path)


def test_refuses_a_size_off_the_patch_grid(exported):
    path = exported[0]
    fields, state = vc.dinov2_state_from_onnx(path)
    with pytest.raises(ValueError, match="multiple of the patch size 4, got 13"):
        vc.vit_state_from_dinov2(vc.dinov2_config(fields, 2), state, 13)
