"""Loading a saved model folder: stock ``from_pretrained`` for uniform widths, and the sliced rebuild
for per-layer widths (``kcm_ffn_widths`` in ``config.json``). ``kcm_core.models.load_model`` sends
every folder with per-layer widths here, so a pruned model can be loaded, evaluated and pruned again.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..arch import config_ffn_width, family_for_config, ffn_blocks, set_ffn_width
from ..plan import KeepPlan, LayerKeep
from ..realise import slice_model
from .files import ONNX_FILE


def load_pruned(path: str | os.PathLike, device: str | torch.device | None = None, *,
                with_tokenizer: bool = False, dtype: torch.dtype | None = None):
    """Load a folder written by ``save_pruned`` (or any saved ``transformers`` model folder).

    Uniform widths load through the stock ``from_pretrained`` of the class named in
    ``config.architectures``; per-layer widths (``kcm_ffn_widths`` in the config) are rebuilt by
    slicing a model made from the config and loading the safetensors state dict strictly.
    Returns the model in eval mode, or ``(model, tokenizer)`` with ``with_tokenizer=True`` (the
    tokenizer, or image processor, is None when the folder has none). Never downloads anything.
    """
    import transformers

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{str(path)!r} is not a folder; load_pruned reads folders written by "
                         "save_pruned or save_pretrained (hub ids: kcm_core.models.load_model)")
    if not (folder / "config.json").exists():
        hint = " It holds only ONNX: load model.onnx with onnxruntime." if (folder / ONNX_FILE).exists() else ""
        raise ValueError(f"{folder} has no config.json.{hint}")
    config = drop_gguf_record(transformers.AutoConfig.from_pretrained(folder, local_files_only=True))
    cls = model_class(config)
    check_shard_indexes(folder)
    from ..runtime import quiet_transformers
    with quiet_transformers():
        if getattr(config, "kcm_ffn_widths", None):
            model = _load_sliced(folder, config, cls)
        else:
            model = _load_stock(folder, cls, config)
    if dtype is not None:
        cast_parameters(model, dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    if not with_tokenizer:
        return model
    return model, _load_preprocessor(folder)


def model_class(config) -> type:
    """The ``transformers`` class ``config.architectures`` names (what ``from_pretrained`` builds)."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        raise ValueError("the config names no model class (config.architectures is empty); "
                         "save the model with save_pruned or save_pretrained")
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ValueError(f"config.architectures names {names[0]!r}, which transformers "
                         f"{transformers.__version__} does not provide")
    return cls


def _load_stock(folder: Path, cls: type, config=None) -> nn.Module:
    """``cls.from_pretrained``, refusing damaged files and weights that do not all fit (as ``load_model``)."""
    from ..errors import check_loading_info, weights_error, weights_error_types
    try:
        # mismatches come back named in the loading info (not as a RuntimeError about a hidden report)
        model, info = cls.from_pretrained(folder, config=config, local_files_only=True, output_loading_info=True,
                                          ignore_mismatched_sizes=True)
    except OSError as err:
        raise ValueError(f"could not load the weights of {folder}: {str(err).splitlines()[0]}") from None
    except weights_error_types() as err:
        raise weights_error(folder, err) from None
    check_loading_info(model, info, folder, saved_as=cls.__name__)
    return model


def _load_sliced(folder: Path, config, cls: type) -> nn.Module:
    """Build at the widest layer's width, slice every layer to its recorded width, load strictly."""
    try:
        from transformers.initialization import no_init_weights        # transformers 5
    except ImportError:                                                 # transformers 4
        from transformers.modeling_utils import no_init_weights

    family = family_for_config(config)
    widths = [int(w) for w in config.kcm_ffn_widths]
    build = copy.deepcopy(config)
    del build.kcm_ffn_widths
    set_ffn_width(build, family, max(widths))
    built = config_ffn_width(build, family)     # the widest layer's, or more (DINOv2: a multiple of hidden)
    with no_init_weights():                 # every tensor is overwritten below
        full = cls(build)
    layers = len(ffn_blocks(full))
    if layers != len(widths):
        raise ValueError(f"{folder}: config records {len(widths)} FFN widths for {layers} layers")
    keep_plan = KeepPlan(tuple(LayerKeep(tuple(range(w)), built) for w in widths), method="reload")
    model = slice_model(full, keep_plan)    # also records the widths in model.config
    del full
    state = _read_safetensors(folder)
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floats) == 1:
        cast_parameters(model, floats.pop())
    _load_state_strict(model, state, folder)
    return model


def drop_gguf_record(config):
    """``config`` without a ``quantization_config`` of ``quant_method: gguf``, which a model loaded with
    ``from_pretrained(..., gguf_file=...)`` leaves behind although its weights are plain dequantised
    tensors: kept, it would load a GGUF quantizer that refuses to save the pruned model, after all the work."""
    record = getattr(config, "quantization_config", None)
    method = record.get("quant_method") if isinstance(record, dict) else getattr(record, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        del config.quantization_config
    return config


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters to ``dtype`` in place, leaving its buffers as they are.

    ``from_pretrained`` does the same: rotary models keep ``inv_freq`` (and their cos/sin tables) in
    float32 whatever the weights' dtype. ``model.to(bfloat16)`` would round them too, and the reloaded
    model would drift from the one that was exported, more with every position.
    """
    for param in model.parameters():            # each Parameter once: tied weights stay tied
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_map(folder: Path, index_name: str = SHARD_INDEXES[0]) -> dict[str, str] | None:
    """The shard index's tensor -> file table of a model folder, checked; None when it has no index.

    One ``ValueError`` sentence naming the index for a file that is not JSON, an index without a
    ``weight_map``, a shard named outside the folder (an absolute path or ``..``, refused as
    ``transformers`` does: hub-cache shards are links, so names are judged, not their targets) and
    a shard that is not there.
    """
    index = Path(folder) / index_name
    if not index.exists():
        return None
    try:
        table = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the shard index {index} is not valid JSON ({err}); restore the index saved "
                         "with the weights") from None
    where = table.get("weight_map") if isinstance(table, dict) else None
    if not (isinstance(where, dict) and where and all(isinstance(v, str) for v in where.values())):
        raise ValueError(f"the shard index {index} has no weight_map (the table naming the file of every "
                         "tensor); restore the index saved with the weights")
    for name in sorted(set(where.values())):
        if Path(name).anchor or ".." in Path(name).parts:
            raise ValueError(f"the shard index {index} names a file outside the model folder ({name!r}); "
                             "refused")
        if not (Path(folder) / name).is_file():
            raise ValueError(f"the shard index {index} names {name}, which is not in {folder}; copy or "
                             "download the model again")
    return dict(where)


def check_shard_indexes(folder: str | os.PathLike) -> None:
    """Every shard index of a local model folder checked (``weight_map``) before ``from_pretrained``
    reads it (it would raise a bare ``KeyError`` or a JSON error naming no file)."""
    for name in SHARD_INDEXES:
        weight_map(Path(folder), name)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import weights_error

    where = weight_map(folder)
    if where is not None:
        files = sorted(set(where.values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{folder} has no model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except SafetensorError as err:          # truncated or corrupt: one sentence, not the Rust error
            raise weights_error(folder, err) from None
    return state


def _load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], folder: Path) -> None:
    """``load_state_dict`` that tolerates only keys that ``save_pretrained`` drops as tied copies."""
    own = model.state_dict()
    bad_shapes = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise ValueError(f"{folder}: tensor shapes do not match the recorded widths: {bad_shapes[:5]}")
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys)
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
        groups: dict[int, set[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), set()).add(name)
        missing = {k for k in missing if not (groups.get(id(_get_param(model, k)), set()) & set(state))}
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: weights do not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")


def _get_param(model: nn.Module, name: str):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, attr, None)


def _load_preprocessor(folder: Path):
    import transformers

    if any((folder / f).exists() for f in ("tokenizer_config.json", "tokenizer.json", "vocab.txt",
                                           "vocab.json", "tokenizer.model")):
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if (folder / "preprocessor_config.json").exists():
        return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return None
