"""Loading models and configs from a local folder or the Hugging Face hub, with clear failures.

Every failure a user can cause (a mistyped path, no network, an unsupported architecture, a
checkpoint with NaN weights) becomes one ``ValueError`` sentence. The architecture check runs on the
config, before any weights are read, so an unsupported model fails in milliseconds.

The word ``"demo"`` is not handled here: the CLI and the app resolve it through ``kcm_core.demos``.
How failures are worded (damaged weights, missing keys, one line for a person) is ``kcm_core.errors``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from . import hub
from .arch import family_for_config
from .errors import check_loading_info, one_line, weights_error, weights_error_types
from .export.loading import check_shard_indexes, drop_gguf_record
from .runtime import check_finite, default_device, quiet_transformers

# task -> name of the transformers Auto class that builds it
TASKS: dict[str, str] = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "base": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
}
# the end of a class name in config.architectures -> the task it was saved for
ARCHITECTURE_TASKS = (("ForSequenceClassification", "sequence-classification"), ("ForCausalLM", "causal-lm"),
                      ("LMHeadModel", "causal-lm"), ("ForImageClassification", "image-classification"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Model types whose position ids start after the pad id: the usable length is the table minus pad + 1.
POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta", "camembert", "mpnet")
GGUF_SUFFIX = ".gguf"


def _looks_like_hub_id(name: str) -> bool:
    if not _HUB_ID.match(name) or ".." in name:
        return False
    head = name.split("/")[0]
    # "out/model" is a local path when "out" exists here; a hub id never starts with a local folder.
    return "/" not in name or not Path(head).exists()


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """``(location, is_local)``; raises ``ValueError`` for paths that do not exist."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model must be a folder or a hub id, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; give a model folder saved with save_pretrained "
                             "or a hub id")
        return str(path), True
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:     # llama.cpp / Ollama: read by transformers
        return str(path), True
    if path.exists():
        raise ValueError(f"{path} is a file; give a model folder with config.json, a .gguf file or a hub id")
    if not _looks_like_hub_id(name_or_path):
        raise ValueError(f"no model folder at {name_or_path}; give a local folder with config.json or a "
                         "hub id")
    return name_or_path, False


def _hub_kwargs(location: str, is_local: bool) -> dict[str, Any]:
    """``from_pretrained`` options: local files only for folders and offline mode, else a probe first."""
    if is_local:
        return {"local_files_only": True}
    if hub.hub_offline():
        return {"local_files_only": True}
    hub.check_hub(location, kind="model")
    return {}


def _offline_error(location: str, err: Exception) -> ValueError:
    return ValueError(f"model {location!r} is not in the local Hugging Face cache and the hub is offline "
                      f"(HF_HUB_OFFLINE is set) ({type(err).__name__}); pass a local folder instead")


# --------------------------------------------------------------------------- loading

def load_config(name_or_path: str | os.PathLike):
    """The ``transformers`` config of a folder (``config.json`` alone is enough) or hub id."""
    from transformers import AutoConfig
    location, is_local = _resolve(name_or_path)
    kwargs = _hub_kwargs(location, is_local)
    if is_gguf(location):
        return _gguf_config(location)
    try:
        with quiet_transformers():
            return drop_gguf_record(AutoConfig.from_pretrained(location, **kwargs))
    except OSError as err:
        if not is_local and kwargs.get("local_files_only"):
            raise _offline_error(location, err) from None
        raise ValueError(f"could not read the config of {location}: {err}") from None
    except ValueError as err:  # unknown model_type, malformed JSON
        raise ValueError(f"could not read the config of {location}: {str(err).splitlines()[0]}") from None


def is_gguf(location: str) -> bool:
    return str(location).lower().endswith(GGUF_SUFFIX) and Path(location).is_file()


def _gguf_needs_package(location) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ValueError(f"reading {location} (a GGUF file) needs the gguf package: pip install gguf") from None


def _gguf_config(location: str):
    """The config of a ``.gguf`` file; GGUF holds causal LMs, so it names the model type's causal-LM class."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    _gguf_needs_package(location)
    path = Path(location)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"could not read the GGUF file {location}: {one_line(err)}") from None
    if not getattr(config, "architectures", None) and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return drop_gguf_record(config)


def _load_gguf(location: str, config, task: str, target, torch_dtype):
    """A ``.gguf`` file dequantised by transformers (``gguf_file=``) and copied into a plain model of the
    same class: transformers keeps a GGUF quantizer on what it loads, which refuses to save the pruned model."""
    import transformers
    try:
        from transformers.initialization import no_init_weights        # transformers 5
    except ImportError:                                                 # transformers 4
        from transformers.modeling_utils import no_init_weights
    if task != "causal-lm":
        raise ValueError(f"{location} is a GGUF file, which holds a causal language model; it loads as "
                         f"causal-lm, not {task}")
    path = Path(location)
    cls = getattr(transformers, config.architectures[0])
    dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
    try:
        with quiet_transformers():
            loaded = cls.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=dtype,
                                         local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                                   local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"could not load the GGUF file {location}: {one_line(err)}") from None
    drop_gguf_record(loaded.config)
    with no_init_weights():
        model = cls(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    del loaded
    from .export.loading import cast_parameters
    cast_parameters(model, dtype)            # parameters only: rotary buffers stay float32
    model.config._name_or_path = str(path)
    check_finite(model)
    return _ready(model, tokenizer, target)


def task_for_config(config) -> str:
    """The task a model was saved for, from the class its config names (``config.architectures``).

    A config naming a bare backbone (``BertModel``) gives ``base``; one naming no class at all (built
    by hand, never saved with a model) gives ``causal-lm`` for a decoder family and
    ``sequence-classification``, this project's first task, for the others.
    """
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        return _task_without_architectures(config)
    for suffix, task in ARCHITECTURE_TASKS:
        if names[0].endswith(suffix):
            return task
    return "base"


def _task_without_architectures(config) -> str:
    """A config that names no class: a decoder family's (LLaMA, Qwen2, Mistral, GPT-2) is a causal LM, the
    others this project's first task (a LLaMA was loaded as LlamaForSequenceClassification and refused)."""
    try:
        decoder = family_for_config(config).decoder
    except ValueError:
        decoder = False
    return "causal-lm" if decoder else "sequence-classification"


def load_model(name_or_path: str | os.PathLike, *, task: str | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
               config_updates: Mapping[str, Any] | None = None, allow_new_head: bool = False,
               **from_pretrained: Any) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode on ``device`` (default: ``default_device()``).

    ``task`` picks the head: ``sequence-classification``, ``causal-lm``, ``base`` or
    ``image-classification`` (which returns an image processor in place of the tokenizer); ``None``
    (the default) loads the class the model was saved as (``task_for_config``), so a model keeps its
    head. A folder written by ``save_pruned`` with per-layer widths (``kcm_ffn_widths`` in its config)
    is rebuilt through ``kcm_core.export.load_pruned``, so pruned models load and prune again. Extra
    keyword arguments go to ``from_pretrained`` (e.g. ``num_labels``). A tokenizer without a pad token
    gets its end-of-text token as pad, and the model's ``pad_token_id`` follows, so GPT-2 classifiers
    accept padded batches.

    Every weight must come from the checkpoint (``check_loading_info``): missing, unexpected or
    mismatched weights are a ``ValueError``, never a silently random layer. Only a task head (and a
    pooler) may be new, and only with ``allow_new_head=True`` (fine-tuning a bare encoder); a head
    the checkpoint has is dropped only when the model is another class than its config names (a
    ``task`` asked for, a masked-LM checkpoint loaded as its backbone). A damaged or refused weights
    file is a ``ValueError`` too (``weights_error``).

    ``device_map`` (passed on to ``from_pretrained``: ``"auto"``, ``"cpu"``, a dict) lets ``accelerate``
    place the weights (several GPUs, CPU offload); ``device`` is then not applied. Models larger than
    memory are pruned with ``kcm_core.streamed`` instead, which never loads them whole.
    """
    import transformers
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    torch_dtype = _dtype(dtype)
    target = _device(device)
    config = load_config(name_or_path)
    family = family_for_config(config)            # unsupported architectures stop here, before weights
    task = task or task_for_config(config)
    if getattr(config, "kcm_ffn_widths", None):
        return _load_per_layer_widths(name_or_path, config, task, target, torch_dtype, family)
    if is_gguf(_resolve(name_or_path)[0]):
        return _load_gguf(_resolve(name_or_path)[0], config, task, target, torch_dtype)
    for key, value in (config_updates or {}).items():
        setattr(config, key, value)
    location, is_local = _resolve(name_or_path)
    if is_local:
        check_shard_indexes(location)             # a bad index: one sentence naming it, not a KeyError
    kwargs = {"local_files_only": True} if is_local or hub.hub_offline() else {}
    auto = getattr(transformers, TASKS[task])
    if torch_dtype is not None:  # None keeps transformers' own default
        kwargs["dtype"] = torch_dtype
    # Mismatched shapes come back named in the loading info and are judged there (a new head may
    # differ in size, a layer may not), instead of transformers' RuntimeError pointing at a hidden report.
    from_pretrained.pop("ignore_mismatched_sizes", None)
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(location, config=config, output_loading_info=True,
                                               ignore_mismatched_sizes=True, **kwargs, **from_pretrained)
    except OSError as err:
        if not is_local and kwargs.get("local_files_only"):
            raise _offline_error(location, err) from None
        raise ValueError(f"could not load the weights of {location}: {str(err).splitlines()[0]}") from None
    except ValueError as err:  # e.g. no class for this task and config
        raise ValueError(f"cannot load {location} for task {task!r}: {str(err).splitlines()[0]}") from None
    except weights_error_types() as err:
        raise weights_error(location, err) from None
    check_loading_info(model, info, location, allow_new_head=allow_new_head,
                       saved_as=(getattr(config, "architectures", None) or [None])[0])
    _refuse_offloaded(model, location)
    check_finite(model)
    processor = load_processor(location, {k: v for k, v in kwargs.items() if k != "dtype"},
                                vision=family.vision or task == "image-classification")
    # accelerate placed the weights itself (several GPUs, CPU offload): moving them would undo it
    return _ready(model, processor, None if from_pretrained.get("device_map") is not None else target)


def _refuse_offloaded(model: torch.nn.Module, location) -> None:
    """accelerate's offload leaves weights on the ``meta`` device and fetches them per forward pass;
    scoring, scaling and slicing read and copy every weight, so such a model cannot be pruned whole."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(f"device_map offloaded {len(offloaded)} weights of {location} out of memory (e.g. "
                         f"{offloaded[0]}); pruning in memory needs every weight on a device: give it more "
                         "memory (max_memory), or prune layer by layer with the streamed mode (prune --stream, "
                         "kcm_core.streamed.prune_streamed), which never loads the model whole")


def _ready(model: torch.nn.Module, processor, target: torch.device | None) -> tuple[torch.nn.Module, Any]:
    """Pad token for tokenizers without one (GPT-2), model on ``target`` (None: where it is) in eval mode."""
    if getattr(processor, "pad_token", "n/a") is None and getattr(processor, "eos_token", None) is not None:
        processor.pad_token = processor.eos_token   # our own fresh tokenizer: safe to set
    if getattr(model.config, "pad_token_id", None) is None and getattr(processor, "pad_token_id", None) is not None:
        model.config.pad_token_id = processor.pad_token_id
    if not getattr(model.config, "architectures", None):    # what it was loaded as: its head is known
        model.config.architectures = [type(model).__name__]
    if target is not None:
        model.to(target)
    model.eval()
    return model, processor


def _load_per_layer_widths(name_or_path, config, task: str, target: torch.device, torch_dtype, family):
    """A pruned folder with per-layer FFN widths: ``load_pruned`` rebuilds it (same class, same head)."""
    from .export.loading import load_pruned
    location, is_local = _resolve(name_or_path)
    if not is_local:
        raise ValueError(f"{location}: per-layer FFN widths (kcm_ffn_widths) load from a local folder only")
    saved = task_for_config(config)
    if task != saved:
        raise ValueError(f"{location} was saved as {config.architectures[0]} ({saved}); a pruned folder "
                         f"with per-layer widths loads only as what it was saved, not as {task}")
    model = load_pruned(location, dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else None)
    check_finite(model)
    processor = load_processor(location, {"local_files_only": True}, vision=family.vision)
    return _ready(model, processor, target)


def max_positions(config) -> int | None:
    """The longest token sequence a text model takes, from its config; None when it has no such limit
    (rotary models without a recorded one, image models)."""
    for field in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", None) in POSITIONS_AFTER_PAD:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


def fit_max_len(max_len: int | None, config, *, default: int = 128, option: str = "max_len") -> int:
    """The truncation length to use: ``max_len`` when the model's position table holds it (refused
    otherwise, before any work: longer inputs would crash the forward pass halfway through scoring);
    None gives ``default``, shortened to the model's positions."""
    limit = max_positions(config)
    if max_len is None:
        return default if limit is None else min(default, limit)
    if limit is not None and max_len > limit:
        raise ValueError(f"{option} {max_len} is longer than this model takes ({limit} positions); choose "
                         f"{option} {limit} or less")
    return max_len


def load_processor(location: str, kwargs: dict[str, Any], vision: bool):
    from transformers import AutoImageProcessor, AutoTokenizer
    loader = AutoImageProcessor if vision else AutoTokenizer
    kind = "image processor" if vision else "tokenizer"
    advice = f"save one with {kind.replace(' ', '_')}.save_pretrained into the model folder"
    try:
        with quiet_transformers():
            processor = loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{location} has no usable {kind} ({type(err).__name__}); {advice}") from None
    # Without tokenizer files transformers 5 builds a tokenizer holding only its special tokens,
    # which would turn every word into [UNK] without a word of warning.
    if not vision and len(processor) <= len(set(processor.all_special_ids)):
        raise ValueError(f"{location} has no usable tokenizer (its vocabulary holds only special tokens: "
                         f"the tokenizer files are missing); {advice}")
    return processor


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be a torch dtype or one of auto, {', '.join(_DTYPES)}, got {dtype!r}")


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
