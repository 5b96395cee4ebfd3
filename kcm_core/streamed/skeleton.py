"""A model held one transformer layer at a time: the pieces of the streamed pipeline (``kcm_core.streamed.passes``).

``Checkpoint`` reads named tensors from a folder's safetensors files, memory-mapped through
``safetensors.safe_open`` and closed again after every read, so pages of the file that were read do not
stay mapped (and counted in the resident set) once a layer is done. ``Skeleton`` is the model built
from its config with every parameter on the ``meta`` device (no memory; non-persistent buffers such as
rotary frequencies are real): the parts outside the layers (embeddings, final norm, head) are loaded
once, and one layer at a time is filled from the checkpoint, run, and emptied again.

A layer is run on recorded inputs: ``Skeleton.layer_inputs`` runs the model's own forward up to its
first layer and records what that layer is called with (hidden states, attention mask, position
embeddings, ...); every later layer of these families is called with the same arguments but its
predecessor's output. ``LayerView`` wraps one materialised layer so that every ``kcm_core`` function
written for a whole model (``collect_stats``, ``teacher_targets``, ``mask_copy``, ``slice_model``, the
method table) sees a one-layer model, and its ``forward`` runs that layer on the next recorded input.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..arch import (base_model, config_ffn_width, family_for_config, first_module, set_ffn_width,
                    transformer_layers)
from ..export.loading import model_class
from ..runtime import Batch, eval_mode, hooks, model_inputs
from ..layer_replay import detached

READ_CHUNK_BYTES = 32 * 2**20
_ITEM_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
               "BOOL": 1}

# One recorded call of a layer: (positional args, keyword args); args[0] is the hidden state.
LayerCall = tuple[tuple, dict[str, Any]]


class _Caught(Exception):
    """Raised by the pre-hook on the first layer once its call has been recorded."""


def layer_output(out):
    """A layer's hidden-state output (layers of some releases return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def next_calls(calls: Sequence[LayerCall], outputs: Sequence[torch.Tensor]) -> list[LayerCall]:
    """The next layer's calls: the same arguments, with each batch's output as the hidden state."""
    return [((out,) + args[1:], kwargs) for (args, kwargs), out in zip(calls, outputs)]


_libc: Any = None


def trim_heap() -> None:
    """Hand the heap's free pages back to the operating system (glibc's ``malloc_trim``; nothing
    elsewhere). A layer's tensors are freed after each step, but glibc keeps most of their pages for
    later allocations, so without this the resident set of a long layer-by-layer run creeps up by
    what its largest steps allocated (measured: the app's path on a 1.1 B model peaked at 2.0 GB
    against 1.35 GB for one ``prune --stream``)."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim            # glibc only
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of a folder's safetensors weight files: at least what loading the model whole holds in
    memory (0 when it has none)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors") if path.is_file())


class Checkpoint:
    """The tensors of a model folder's safetensors files (``model.safetensors`` or a sharded index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        from ..export.loading import weight_map
        where = weight_map(self.folder)        # checked: JSON, weight_map, shards inside and present
        if where is not None:
            self.where: dict[str, str] = where
        elif (self.folder / "model.safetensors").exists():
            with self._opened("model.safetensors") as f:
                self.where = {key: "model.safetensors" for key in f.keys()}
        else:
            raise ValueError(f"{self.folder} has no model.safetensors (or index): the streamed mode reads "
                             "safetensors weights only; save the model with save_pretrained")

    def _opened(self, name: str):
        from safetensors import SafetensorError, safe_open

        from ..errors import weights_error
        try:
            return safe_open(str(self.folder / name), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:
            raise weights_error(self.folder, err) from None

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors named ``keys``, copied out of the file ``READ_CHUNK_BYTES`` at a time, the file
        being opened (mapped) for each chunk and closed (unmapped) after it: the mapped pages of a
        large tensor (an embedding) never sit in the resident set beside its copy."""
        from safetensors import SafetensorError

        from ..errors import weights_error
        out: dict[str, torch.Tensor] = {}
        try:
            for key in keys:
                out[key] = self._read_one(self.where[key], key)
        except SafetensorError as err:
            raise weights_error(self.folder, err) from None
        return out

    def _read_one(self, name: str, key: str) -> torch.Tensor:
        with self._opened(name) as f:
            part = f.get_slice(key)
            shape = tuple(part.get_shape())
            row_bytes = max(1, math.prod(shape[1:]) * _ITEM_BYTES.get(part.get_dtype(), 4))
            if len(shape) < 2 or shape[0] * row_bytes <= READ_CHUNK_BYTES:
                return f.get_tensor(key)
            first = part[0:1]
        tensor = torch.empty(shape, dtype=first.dtype)
        rows = max(1, READ_CHUNK_BYTES // row_bytes)
        for start in range(0, shape[0], rows):
            with self._opened(name) as f:
                tensor[start:start + rows] = f.get_slice(key)[start:start + rows]
        return tensor


class Skeleton:
    """A model of ``folder``'s config with parameters on ``meta``, filled from its checkpoint on demand."""

    def __init__(self, folder: str | Path, device: torch.device):
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from ..runtime import quiet_transformers
        self.folder, self.device = Path(folder), device
        from ..export.loading import drop_gguf_record
        self.config = drop_gguf_record(AutoConfig.from_pretrained(self.folder, local_files_only=True))
        self.family = family_for_config(self.config)
        kinds = set(getattr(self.config, "layer_types", None) or [])
        if len(kinds) > 1:
            raise ValueError(f"{self.folder} mixes layer types {sorted(kinds)}: their attention masks "
                             "differ per layer, which the streamed mode does not replay; prune it "
                             "without --stream")
        with init_empty_weights(include_buffers=False), quiet_transformers():
            self.model = _empty_model(self.config, self.family)
        # outside the context, whose register_parameter would give the head a new empty tensor
        self.model.tie_weights()                 # tied head and embeddings share one tensor, as loaded
        self.model.eval()
        self.checkpoint = Checkpoint(self.folder)
        self.layers_name, self.layers = transformer_layers(self.model)
        self.layers_path = first_module(base_model(self.model), self.family.layers)[0]
        self._keys = self._match_keys()

    # ---------------------------------------------------------------- names
    def _match_keys(self) -> dict[str, str]:
        """Each parameter name of the model -> its key in the checkpoint; refuses any that are missing,
        and checkpoint tensors the model does not use (as ``check_loading_info`` does). A checkpoint key
        is matched under the name ``from_pretrained`` gives it (``loaded_names``: transformers 5 renames
        ViT's ``encoder.layer.N.intermediate.dense`` to ``layers.N.mlp.fc1``, ...)."""
        prefix = f"{getattr(self.model, 'base_model_prefix', '')}."
        have = loaded_names(self.model, self.checkpoint.where, self.folder)     # loaded name -> key
        keys: dict[str, str] = {}
        missing = []
        groups = self._tie_groups()
        for names in groups:
            found = None
            for name in names:
                for key in (name, name[len(prefix):] if name.startswith(prefix) else None, prefix + name):
                    if key and key in have:
                        found = have[key]
                        break
                if found:
                    break
            if found is None:
                missing.append(names[0])
            for name in names:
                keys[name] = found
        if missing:
            raise ValueError(f"{self.folder} lacks weights that {type(self.model).__name__} needs "
                             f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): the checkpoint "
                             "is incomplete or was saved for another config; restore the config.json saved "
                             "with these weights, or prune it without --stream")
        used = set(keys.values())
        for name in self.model.state_dict():         # persistent buffers a checkpoint may hold
            for key in (name, name[len(prefix):] if name.startswith(prefix) else name, prefix + name):
                used.add(have.get(key, key))
        unused = sorted(k for k in self.checkpoint.where if k not in used)
        if unused:
            raise ValueError(f"{self.folder} holds weights that {type(self.model).__name__} does not use "
                             f"({', '.join(unused[:3])}); restore the config.json saved with these weights")
        return keys

    def _tie_groups(self) -> list[list[str]]:
        """Parameter names grouped by the tensor they share (tied embeddings and head)."""
        groups: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        return list(groups.values())

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_name}.{index}."

    def _in_layers(self, name: str) -> bool:
        return name.startswith(self.layers_name + ".")

    # ---------------------------------------------------------------- filling and emptying
    def _fill(self, root: nn.Module, names: Sequence[str], strip: str = "") -> dict[str, nn.Parameter]:
        """Load the parameters ``names`` (qualified in the model) into ``root``; returns what they replaced."""
        groups = [g for g in self._tie_groups() if g[0] in set(names)]
        tensors = self.checkpoint.read(sorted({self._keys[g[0]] for g in groups}))
        replaced = {}
        for group in groups:
            tensor = tensors[self._keys[group[0]]].to(self.device)
            param = nn.Parameter(tensor, requires_grad=False)
            for name in group:
                local = name[len(strip):]
                owner, _, attr = local.rpartition(".")
                module = root.get_submodule(owner) if owner else root
                replaced[local] = module._parameters[attr]
                module._parameters[attr] = param
        return replaced

    def load_outside_layers(self, *, head: bool = True) -> "LoadedLayer":
        """Fill embeddings, final norm, pooler and (with ``head``) the output embeddings: everything
        that is not a transformer layer. ``free`` on the result empties them again. Recording the
        first layer's inputs needs no head, and an LM head is as large as the embeddings."""
        skip = set()
        output = self.model.get_output_embeddings() if not head else None
        if output is not None:
            tied = {id(p) for n, p in self.model.named_parameters() if not n.startswith(self._head_prefix(output))}
            skip = {id(p) for p in output.parameters() if id(p) not in tied}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        names = [n for g in self._tie_groups() for n in g
                 if not self._in_layers(n) and id(params[n]) not in skip]
        return LoadedLayer(-1, self.model, self._fill(self.model, names))

    def _head_prefix(self, module: nn.Module) -> str:
        return next(name for name, m in self.model.named_modules() if m is module) + "."

    def outside_layer_names(self) -> list[str]:
        """One name per distinct non-layer tensor, in the order the model holds them."""
        return [g[0] for g in self._tie_groups() if not self._in_layers(g[0])]

    def outside_layer_tensors(self) -> dict[str, torch.Tensor]:
        """The non-layer tensors as held now (after ``load_outside_layers``), keyed by model name."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return {name: params[name].detach() for name in self.outside_layer_names()
                if self._keys[name] in self.checkpoint.where}

    def load_layer(self, index: int) -> "LoadedLayer":
        """Fill layer ``index`` from the checkpoint; ``LoadedLayer.free`` empties it again."""
        prefix = self.layer_prefix(index)
        layer = self.layers[index]
        names = [prefix + n for n, _ in layer.named_parameters(remove_duplicate=False)]
        replaced = self._fill(layer, names, strip=prefix)
        return LoadedLayer(index, layer, replaced)

    # ---------------------------------------------------------------- running
    def layer_inputs(self, batches: Sequence[Batch]) -> list[LayerCall]:
        """Run each batch through the model up to its first layer and record that layer's call.
        Needs ``load_outside_layers`` first. Caches are switched off, so no keys or values pile up."""
        import inspect
        calls: list[LayerCall] = []

        def catch(_module, args, kwargs):
            calls.append((tuple(detached(a) for a in args), {k: detached(v) for k, v in kwargs.items()}))
            raise _Caught

        extra = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}
        handles = [self.layers[0].register_forward_pre_hook(catch, with_kwargs=True)]
        with hooks(handles), eval_mode(self.model), torch.no_grad():
            for batch in batches:
                try:
                    self.model(**model_inputs(batch, self.device), **extra)
                except _Caught:
                    continue
                raise ValueError(f"{type(self.model).__name__}: the forward pass never reached its first "
                                 "layer; this model's layers do not run the way the adapter table says")
        return calls

    def finish(self, batches: Sequence[Batch], last_outputs: Sequence[torch.Tensor]):
        """The model's output on ``batches`` when its last layer gave ``last_outputs``: the layers are
        replayed (``kcm_core.layer_replay.Replay``), so only the parts after them run (final norm, head)."""
        from ..layer_replay import Replay
        state = {"batch": 0}
        originals = list(self.layers)
        outputs = []
        try:
            for j, original in enumerate(originals):
                self.layers[j] = Replay(original, list(last_outputs), state)
            with eval_mode(self.model), torch.no_grad():
                for b, batch in enumerate(batches):
                    state["batch"] = b
                    outputs.append(self.model(**model_inputs(batch, self.device)))
        finally:
            for j, original in enumerate(originals):
                self.layers[j] = original
        return outputs


def _empty_model(config, family) -> nn.Module:
    """The model class of ``config`` with empty parameters; per-layer widths (``kcm_ffn_widths``, a
    pruned folder) are built at the widest layer and sliced, as ``load_pruned`` does."""
    import copy

    from ..plan import KeepPlan, LayerKeep
    from ..realise import slice_model
    widths = getattr(config, "kcm_ffn_widths", None)
    if not widths:
        return model_class(config)(config)
    build = copy.deepcopy(config)
    del build.kcm_ffn_widths
    set_ffn_width(build, family, max(widths))
    built = config_ffn_width(build, family)     # the widest layer's, or more (DINOv2: a multiple of hidden)
    full = model_class(config)(build)
    plan = KeepPlan(tuple(LayerKeep(tuple(range(w)), built) for w in widths), method="reload")
    return slice_model(full, plan)




def _weight_transforms(model: nn.Module, *, add_legacy: bool = True):
    """transformers 5's renamings and converters for ``model`` (what ``from_pretrained`` applies to a
    checkpoint's keys, and ``save_pretrained`` reverts), or ``None`` under transformers 4 (no renames)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:                                                 # transformers 4
        return None
    transforms = get_model_conversion_mapping(model, add_legacy=add_legacy)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def loaded_names(model: nn.Module, keys: Iterable[str], folder: Path | str = "") -> dict[str, str]:
    """Each checkpoint key under the name ``from_pretrained`` loads it as -> the key.

    The same renaming ``transformers.core_model_loading`` applies on load (its ``rename_source_key`` with
    the model's ``get_model_conversion_mapping``), including its fallback to the key itself when the
    model already has that name (a folder written with the loaded names). Keys that a converter would
    split or merge (e.g. DINOv2's fused SwiGLU ``mlp.weights_in``) cannot be read one tensor at a time as
    saved: refused, naming the key."""
    keys = list(keys)
    found = _weight_transforms(model)
    if found is None:
        return {key: key for key in keys}
    from transformers.core_model_loading import rename_source_key
    renamings, converters = found
    prefix = getattr(model, "base_model_prefix", None) or None
    meta = model.state_dict()
    out: dict[str, str] = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:              # as transformers: keep a name the model has
            name, converted = rename_source_key(key, [], [], prefix, meta)
        if converted is not None:
            raise ValueError(f"{folder}: transformers converts the tensor {key} on load (it splits or merges "
                             f"tensors matching {converted!r}), which the streamed mode cannot do one "
                             "tensor at a time; prune it without --stream")
        if name in out:
            raise ValueError(f"{folder}: the tensors {out[name]} and {key} both load as {name}; "
                             "the checkpoint is ambiguous, prune it without --stream")
        out[name] = key
    return out


def saved_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (named as ``model`` holds them) under the names stock ``save_pretrained`` writes:
    transformers 5 reverts its load-time renames on save (ViT's ``layers.N.mlp.fc1`` is written as
    ``encoder.layer.N.intermediate.dense``), so older readers find them. Renamings only; unchanged under
    transformers 4."""
    found = _weight_transforms(model, add_legacy=False)
    if found is None or not found[0]:
        return tensors
    from transformers.core_model_loading import rename_source_key
    reverse = [t.reverse_transform() for t in found[0][::-1]]
    return {rename_source_key(name, reverse, [], reverse=True)[0]: t for name, t in tensors.items()}


@dataclass
class LoadedLayer:
    """One layer filled with its weights; ``free`` puts the empty (meta) parameters back."""

    index: int
    module: nn.Module
    replaced: Mapping[str, nn.Parameter]

    def free(self) -> None:
        for local, param in self.replaced.items():
            owner, _, attr = local.rpartition(".")
            module = self.module.get_submodule(owner) if owner else self.module
            module._parameters[attr] = param
        self.replaced = {}
        trim_heap()


class LayerView(nn.Module):
    """A one-layer model around ``layer``: ``config`` and the family's layer path as in the real model,
    so ``ffn_blocks`` and every whole-model function of ``kcm_core`` work on it unchanged. ``forward``
    ignores the batch it is given and runs the layer on the next call set by ``feed`` (calls are fed in
    batch order, as every caller runs its batches), recording each output in ``outputs``."""

    def __init__(self, config, layers_path: str, layer: nn.Module):
        super().__init__()
        self.config = config
        node: nn.Module = self
        parts = layers_path.split(".")
        for part in parts[:-1]:
            child = nn.Module()
            setattr(node, part, child)
            node = child
        setattr(node, parts[-1], nn.ModuleList([layer]))
        self._layers_path = layers_path
        self.feed([])

    @property
    def layer(self) -> nn.Module:
        return self.get_submodule(self._layers_path)[0]

    def feed(self, calls: Sequence[LayerCall]) -> "LayerView":
        """Set the calls the next forward passes run; clears ``outputs``. Feed nothing before copying."""
        self._calls, self._cursor, self.outputs = list(calls), 0, []
        return self

    @contextlib.contextmanager
    def again(self) -> Iterator["LayerView"]:
        """Run the calls fed last once more in the block (a second pass over the same layer inputs);
        afterwards ``outputs`` are those of the first pass, for the next layer. When nothing ran yet,
        the block's pass is the first one and its outputs are kept."""
        calls, cursor, outputs = self._calls, self._cursor, self.outputs
        if cursor == 0:
            yield self
            return
        self.feed(calls)
        try:
            yield self
        finally:
            self._calls, self._cursor, self.outputs = calls, cursor, outputs

    def forward(self, **_batch):
        args, kwargs = self._calls[self._cursor]
        self._cursor += 1
        out = layer_output(self.layer(*args, **kwargs))
        self.outputs.append(out)
        return out
