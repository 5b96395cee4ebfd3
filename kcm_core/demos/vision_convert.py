"""A DINOv2 backbone exported to ONNX, turned back into stock ``transformers`` modules.

``dinov2_from_onnx`` rebuilds a ``Dinov2Model`` from an ONNX graph that ``torch.onnx.export`` made of
one (the vision demo's backbone ships only as such a graph). Most initializers keep the module names
of Hugging Face's ``Dinov2Model`` (``embeddings.cls_token``, ``encoder.layer.3.norm1.weight``, ...,
possibly under a prefix such as ``backbone.``); the exporter folds every linear weight into an unnamed
``onnx::MatMul_*`` initializer, already transposed to ``(in, out)``, and the node that consumes it
says which module it was (``/backbone/encoder/layer.3/mlp/fc1/MatMul``). The position embeddings
are split by the exporter into the class position ``(1, 1, D)`` and the patch grid ``(1, G*G, D)``,
both unnamed; they are recognised by shape, as inputs of nodes in the embeddings' scope.

``vit_state_from_dinov2`` folds DINOv2's per-channel ``layer_scale1/2`` into the attention output
projection and ``fc2`` (``y = l * (W x + b) = (l W) x + l b``, exact up to rounding) and interpolates
the position embeddings once, with DINOv2's own bicubic resampling, to a fixed working size: the
result is a plain ``ViTModel`` that every part of this project (and stock ``transformers``) knows.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

_LINEAR_NODE = re.compile(r"/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense"
                          r"|attention/[qkvo]_proj|mlp/fc1|mlp/fc2)/MatMul$")
# transformers 5 names the attention projections q/k/v/o_proj; graphs exported from it say so. Both
# layouts are read into the checkpoint names of the original layout.
_NEW_NAMES = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
              "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}


def _old_name(name: str) -> str:
    for new, old in _NEW_NAMES.items():
        name = name.replace(f".{new}.", f".{old}.")
    return name


def _onnx_arrays(path: str | Path) -> tuple[dict[str, "object"], list]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ValueError("reading an ONNX graph needs the onnx package: pip install onnx") from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # onnx raises DecodeError and friends
        raise ValueError(f"{Path(path).name} is not a readable ONNX model ({type(err).__name__})") from None
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:               # small constants may be Constant nodes, not initializers
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            arrays.setdefault(node.output[0], numpy_helper.to_array(node.attribute[0].t))
    return arrays, list(graph.node)


def dinov2_state_from_onnx(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config fields, state dict)`` of the ``Dinov2Model`` inside an exported ONNX graph."""
    arrays, nodes = _onnx_arrays(path)
    cls_names = [n for n in arrays if n.endswith("embeddings.cls_token")]
    if len(cls_names) != 1:
        raise ValueError(f"{Path(path).name} holds no DINOv2 backbone (no embeddings.cls_token initializer)")
    prefix = cls_names[0][: -len("embeddings.cls_token")]
    state: dict[str, torch.Tensor] = {}
    for name, value in arrays.items():
        if name.startswith(prefix) and not name.startswith("onnx::") and (
                name[len(prefix):].startswith(("embeddings.", "encoder.", "layernorm."))):
            state[_old_name(name[len(prefix):])] = torch.from_numpy(value.copy())
    node_prefix = "/" + prefix.rstrip(".").replace(".", "/") if prefix else ""
    for node in nodes:
        match = _LINEAR_NODE.search(node.name)
        if node.op_type != "MatMul" or match is None or not node.name.startswith(node_prefix + "/encoder/"):
            continue
        weight = next((arrays[i] for i in node.input if i in arrays), None)
        if weight is None or weight.ndim != 2:
            raise ValueError(f"{node.name} has no constant weight matrix")
        module = match.group(2).replace("/", ".")
        state[_old_name(f"encoder.layer.{match.group(1)}.{module}.weight")] = torch.from_numpy(
            weight.T.copy())  # (out, in)
    state["embeddings.position_embeddings"] = _position_embeddings(arrays, nodes, node_prefix, state)
    # Used only for masked-image pre-training, so the exporter dropped it; Dinov2Model still has one.
    state.setdefault("embeddings.mask_token", torch.zeros_like(state["embeddings.cls_token"][0]))
    return _config_fields(state), state


def _position_embeddings(arrays: dict, nodes: list, node_prefix: str, state: dict) -> torch.Tensor:
    """The class position and the patch grid, recognised by shape among the embeddings' inputs."""
    if "embeddings.position_embeddings" in state:
        return state["embeddings.position_embeddings"]
    dim = state["embeddings.cls_token"].shape[-1]
    scope = node_prefix + "/embeddings/"
    inputs = {i for node in nodes if node.name.startswith(scope) for i in node.input if i.startswith("onnx::")}
    cls_pos, grid = [], []
    for name in sorted(inputs):
        value = arrays.get(name)
        if value is None or value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != dim:
            continue
        if value.shape[1] == 1:
            cls_pos.append(value)
        elif math.isqrt(value.shape[1]) ** 2 == value.shape[1]:
            grid.append(value)
    if len(cls_pos) != 1 or len(grid) != 1:
        raise ValueError("cannot tell the position embeddings in the ONNX graph apart "
                         f"({len(cls_pos)} class-position and {len(grid)} grid candidates)")
    return torch.cat([torch.from_numpy(cls_pos[0].copy()), torch.from_numpy(grid[0].copy())], dim=1)


def _config_fields(state: dict[str, torch.Tensor]) -> dict:
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    width = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    needed = [f"encoder.layer.{i}.{m}.weight" for i in range(layers) for m in (
        "attention.attention.query", "attention.attention.key", "attention.attention.value",
        "attention.output.dense", "mlp.fc1", "mlp.fc2")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"the ONNX graph lacks {len(missing)} weight matrices, e.g. {missing[0]}")
    return {"hidden_size": hidden, "num_hidden_layers": layers, "patch_size": patch,
            "image_size": grid * patch, "mlp_ratio": _ratio(width, hidden),
            "num_channels": state["embeddings.patch_embeddings.projection.weight"].shape[1]}


def _ratio(width: int, hidden: int) -> int:
    if width % hidden:
        raise ValueError(f"MLP width {width} is not a multiple of the hidden size {hidden} (Dinov2Config "
                         "takes an integer mlp_ratio)")
    return width // hidden


# State dicts here use the checkpoint names of the original Hugging Face layouts (``encoder.layer.N.
# attention.attention.query``, ...): every transformers release loads them through its own key
# conversion, whatever its modules are called now, so nothing below depends on the installed layout.

def write_checkpoint(folder: str | Path, config, state: dict[str, torch.Tensor]) -> Path:
    """``config.json`` + ``model.safetensors`` in ``folder``: what ``from_pretrained`` reads."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def dinov2_config(fields: dict, num_attention_heads: int, layer_norm_eps: float = 1e-6):
    from transformers import Dinov2Config
    return Dinov2Config(**fields, num_attention_heads=num_attention_heads, layer_norm_eps=layer_norm_eps,
                        architectures=["Dinov2Model"])


def interpolate_positions(positions: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's bicubic resampling of the patch position grid (class position kept): ``(1, 1+G*G, D)``
    to ``(1, 1+grid*grid, D)``, in float32 as ``Dinov2Embeddings.interpolate_pos_encoding`` does."""
    cls_pos, patch_pos = positions[:, :1], positions[:, 1:]
    side, dim = math.isqrt(patch_pos.shape[1]), patch_pos.shape[2]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patch_pos = nn.functional.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


@torch.no_grad()
def vit_state_from_dinov2(config, state: dict[str, torch.Tensor], image_size: int,
                          prefix: str = "vit.") -> tuple[object, dict[str, torch.Tensor]]:
    """``(ViTConfig, state dict)`` of a plain ViT computing what the DINOv2 backbone ``state`` computes on
    ``image_size`` x ``image_size`` inputs: layer scales folded into the projections they follow
    (``l * (W x + b) = (l W) x + l b``), the position grid interpolated once."""
    from transformers import ViTConfig
    patch = config.patch_size
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of the patch size {patch}, got {image_size}")
    vit_config = ViTConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                           num_attention_heads=config.num_attention_heads,
                           intermediate_size=int(config.hidden_size * config.mlp_ratio),
                           hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
                           image_size=image_size, patch_size=patch, num_channels=config.num_channels,
                           qkv_bias=config.qkv_bias, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    out = {f"{prefix}embeddings.cls_token": state["embeddings.cls_token"],
           f"{prefix}embeddings.position_embeddings": interpolate_positions(
               state["embeddings.position_embeddings"], image_size // patch),
           f"{prefix}layernorm.weight": state["layernorm.weight"], f"{prefix}layernorm.bias": state["layernorm.bias"]}
    for kind in ("weight", "bias"):
        out[f"{prefix}embeddings.patch_embeddings.projection.{kind}"] = state[
            f"embeddings.patch_embeddings.projection.{kind}"]
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attention.attention.query":
               "attention.attention.query", "attention.attention.key": "attention.attention.key",
               "attention.attention.value": "attention.attention.value", "mlp.fc1": "intermediate.dense"}
    folded = {"attention.output.dense": ("attention.output.dense", "layer_scale1"),
              "mlp.fc2": ("output.dense", "layer_scale2")}
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"{prefix}encoder.layer.{i}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[dst + f"{new}.{kind}"] = state[src + f"{old}.{kind}"]
        for old, (new, scale_name) in folded.items():
            scale = state[src + f"{scale_name}.lambda1"]                      # (out,)
            out[dst + f"{new}.weight"] = state[src + f"{old}.weight"] * scale[:, None]   # (out, in)
            out[dst + f"{new}.bias"] = state[src + f"{old}.bias"] * scale
    return vit_config, out
