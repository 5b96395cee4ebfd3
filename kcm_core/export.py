"""Export a pruned model so that it loads anywhere, and prove it before calling it done.

``save_pruned`` writes a physically sliced model (``kcm_core.realise.slice_model``) as

- ``"hf"``: safetensors weights, ``config.json`` and the tokenizer via ``save_pretrained``, plus the plan
  (``kcm_plan.json``), the caller's report (``report.json``), a Markdown summary (``report.md``) and
  ``export.json`` (what was verified, and how to load it). When every layer keeps the same width, the
  config's stock width field holds it and plain ``transformers`` loads the folder with no project code::

      cfg = transformers.AutoConfig.from_pretrained(folder)
      model = getattr(transformers, cfg.architectures[0]).from_pretrained(folder)
      # or the matching Auto class, e.g. AutoModelForSequenceClassification.from_pretrained(folder)

  When widths differ per layer (or a GPT-2 ``Conv1D`` layer is emptied, which stock code cannot run),
  the config also records ``kcm_ffn_widths`` and ``load_pruned(folder)`` loads it: the model is built
  from the config at the widest layer's width, each layer is sliced to its recorded width, and the
  safetensors state dict is loaded strictly (every tensor present, every shape equal).
- ``"onnx"``: ``model.onnx`` from ``torch.onnx.export`` with the dynamo exporter (``dynamo=True``) and
  dynamic batch and sequence axes. With torch 2.13 the legacy TorchScript exporter (``dynamo=False``)
  also produces a loadable file, but it bakes part of the attention-mask computation in at trace time,
  so its outputs on other inputs differ by up to 0.08 on BERT, DistilBERT and GPT-2; it is kept only as a
  fallback when the dynamo exporter fails, and the verification below then decides.

Every export is written into a temporary sibling folder, reloaded in a fresh Python process (stock
``from_pretrained`` / ``load_pruned`` / ONNX Runtime on the CPU), run on a fixed probe input and
compared with the in-memory model; only then is the folder renamed into place. Any failure, including
a ``KeyboardInterrupt``, removes the temporary folder, so no half-written export is ever left behind.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .arch import family_for_config, family_for_model, ffn_blocks, model_shape
from .plan import KeepPlan, LayerKeep
from .realise import record_widths, slice_model
from .runtime import Progress, eval_mode, model_device, tell

FORMATS = ("hf", "onnx")
# Largest acceptable |reloaded - in-memory| on the probe, by parameter dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
VERIFY_TIMEOUT_S = 900           # one fresh process loads and runs every format of one export
ONNX_FILE = "model.onnx"
PROBE_FILE = ".kcm_probe.npz"
PROBE_OUT_FILE = ".kcm_probe_out.npz"
PLAN_FILE = "kcm_plan.json"
REPORT_FILE = "report.json"
REPORT_MD = "report.md"
EXPORT_FILE = "export.json"
# Probe sizes: the ONNX graph is traced with one shape and checked with another (dynamic axes).
TRACE_BATCH, TRACE_SEQ = 2, 8
PROBE_BATCH, PROBE_SEQ = 3, 11

_target_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass
class ExportResult:
    """What ``save_pruned`` wrote and how well the fresh-process reload matched."""

    out_dir: Path
    formats: tuple[str, ...]
    max_abs_diff: dict[str, float] = field(default_factory=dict)   # per format; empty if not verified
    reloaded_ok: bool = False
    loader: str = ""                        # "transformers" (stock) or "kcm_core.load_pruned"
    onnx_exporter: str | None = None        # "dynamo" or "legacy"
    tolerance: float | None = None
    files: tuple[str, ...] = ()


# --------------------------------------------------------------------------- loading

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
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = _model_class(config)
    from .models import quiet_transformers
    with quiet_transformers():
        if getattr(config, "kcm_ffn_widths", None):
            model = _load_sliced(folder, config, cls)
        else:
            model = cls.from_pretrained(folder, local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    if not with_tokenizer:
        return model
    return model, _load_preprocessor(folder)


def _model_class(config) -> type:
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
    setattr(build, family.width_field[0], max(widths))
    with no_init_weights():                 # every tensor is overwritten below
        full = cls(build)
    layers = len(ffn_blocks(full))
    if layers != len(widths):
        raise ValueError(f"{folder}: config records {len(widths)} FFN widths for {layers} layers")
    keep_plan = KeepPlan(tuple(LayerKeep(tuple(range(w)), max(widths)) for w in widths), method="reload")
    model = slice_model(full, keep_plan)    # also records the widths in model.config
    del full
    state = _read_safetensors(folder)
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floats) == 1:
        model = model.to(floats.pop())
    _load_state_strict(model, state, folder)
    return model


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{folder} has no model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
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


# --------------------------------------------------------------------------- saving

def save_pruned(model: nn.Module, out_dir: str | os.PathLike, *, plan: KeepPlan | None = None,
                report: Mapping[str, Any] | None = None, tokenizer=None,
                formats: Sequence[str] = ("hf",), overwrite: bool = False, verify: bool = True,
                progress: Progress | None = None) -> ExportResult:
    """Write ``model`` (a sliced model) to ``out_dir`` in ``formats``, verified and atomically.

    formats: any of ``"hf"`` (safetensors + config + tokenizer; stock-loadable when widths are uniform)
        and ``"onnx"`` (``model.onnx``, dynamic batch and sequence axes). The plan, report and a
        Markdown summary are written in every case.
    verify: reload every format in a fresh process and compare with ``model`` on a fixed probe; a
        difference above ``TOLERANCE`` (1e-4 for fp32) raises ``ValueError`` and leaves nothing.
    The model is not modified. Raises ``ValueError`` if ``out_dir`` exists and ``overwrite`` is False.
    """
    formats = _check_formats(formats)
    out_dir = Path(out_dir)
    family_for_model(model)                  # unsupported models fail at the door
    _refuse_existing(out_dir, overwrite)
    lock = _lock_for(out_dir)
    if not lock.acquire(blocking=False):
        raise ValueError(f"another export to {out_dir} is running in this process")
    try:
        return _save_locked(model, out_dir, plan, report, tokenizer, formats, overwrite, verify, progress)
    finally:
        lock.release()


def _save_locked(model, out_dir: Path, plan, report, tokenizer, formats, overwrite, verify,
                 progress) -> ExportResult:
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():                         # left by a killed process that had our pid
        _remove(tmp)
    config, loader = _export_config(model)
    result = ExportResult(out_dir=out_dir, formats=formats, loader=loader)
    try:
        tmp.mkdir()
        with eval_mode(model), torch.no_grad():
            tell(progress, "export: preparing the probe input", 0.02)
            spec = _io_spec(model)
            probe = _probe_inputs(model, spec, PROBE_BATCH, PROBE_SEQ, seed=0)
            expected, output = _run_torch(model, probe)
            spec = replace(spec, output=output)
            if "hf" in formats:
                tell(progress, "export: writing safetensors and config", 0.1)
                _write_hf(model, config, tmp, uniform_stock=loader == "transformers")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if "onnx" in formats:
                tell(progress, "export: exporting ONNX", 0.3)
                result.onnx_exporter = _write_onnx(model, spec, tmp / ONNX_FILE)
        if verify:
            tell(progress, "export: reloading in a fresh process", 0.6)
            result.tolerance = _tolerance(model)
            result.max_abs_diff = _verify(tmp, formats, loader, spec, probe, expected, result.tolerance)
            result.reloaded_ok = True
        tell(progress, "export: writing the report", 0.9)
        _write_reports(tmp, model, config, plan, report, result, spec)
        for name in (PROBE_FILE, PROBE_OUT_FILE):
            (tmp / name).unlink(missing_ok=True)
        _normalise_permissions(tmp)
        result.files = tuple(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    tell(progress, "export: done", 1.0)
    return result


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(dict.fromkeys(str(f).strip().lower() for f in formats))
    if not formats:
        raise ValueError(f"choose at least one export format of {', '.join(FORMATS)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    return formats


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite)")


def _lock_for(out_dir: Path) -> threading.Lock:
    key = str(out_dir.resolve())
    with _locks_guard:
        return _target_locks.setdefault(key, threading.Lock())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _normalise_permissions(folder: Path) -> None:
    """Some writers create 0600 files; an export is meant to be shared, so follow the umask."""
    umask = _current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _current_umask() -> int:
    # Read, not set-and-restore: os.umask(0) would briefly change it for every thread.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp, out_dir)
        return
    if not overwrite:                        # appeared while we were exporting
        raise ValueError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite)")
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    _remove(old)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)             # put the previous export back
        raise
    _remove(old)


def _export_config(model: nn.Module):
    """A copy of the model's config with the real per-layer widths, and the loader it will need."""
    family = family_for_model(model)
    widths = [block.width for block in ffn_blocks(model)]
    config = copy.deepcopy(model.config)
    record_widths(config, family.width_field[0], widths)
    # realise.py swaps in its own module class for emptied GPT-2 Conv1D layers: stock code cannot run them.
    custom = any(type(m).__module__.startswith(__package__ + ".") for m in model.modules())
    if custom and not getattr(config, "kcm_ffn_widths", None):
        config.kcm_ffn_widths = list(widths)
    loader = "kcm_core.load_pruned" if getattr(config, "kcm_ffn_widths", None) else "transformers"
    config.architectures = [type(model).__name__]
    return config, loader


def _write_hf(model: nn.Module, config, folder: Path, *, uniform_stock: bool) -> None:
    # A shallow copy shares every tensor; only its ``config`` attribute differs, so saving never
    # touches the caller's model or config (save_pretrained writes into the config it saves).
    twin = copy.copy(model)
    twin.config = config
    from .models import quiet_transformers

    # Stock loaders may expect the checkpoint's original key names; load_pruned reads the model's own.
    options = {}
    if "save_original_format" in inspect.signature(twin.save_pretrained).parameters:   # transformers 5
        options["save_original_format"] = uniform_stock
    with quiet_transformers():               # no "Writing model shards" bar on the caller's stderr
        twin.save_pretrained(str(folder), **options)


# --------------------------------------------------------------------------- probe and ONNX

@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[str, ...]             # in forward order
    output: str                         # "logits", or "last_hidden_state" for a bare backbone
    vision: bool
    vocab: int
    pad_id: int | None
    type_vocab: int
    image: tuple[int, int, int]         # channels, height, width (vision only)
    max_positions: int


def _io_spec(model: nn.Module) -> IOSpec:
    config = model.config
    shape = model_shape(config)
    params = inspect.signature(model.forward).parameters
    if shape.vision:
        inputs: tuple[str, ...] = ("pixel_values",)
        size = int(config.image_size)
        image = (int(getattr(config, "num_channels", 3)), size, size)
    else:
        inputs = ("input_ids",) + tuple(
            name for name in ("attention_mask", "token_type_ids") if name in params
            and (name != "token_type_ids" or getattr(config, "type_vocab_size", 0)))
        image = (0, 0, 0)
    return IOSpec(inputs=inputs, output="logits", vision=shape.vision, vocab=shape.vocab_size,
                  pad_id=getattr(config, "pad_token_id", None),
                  type_vocab=int(getattr(config, "type_vocab_size", 0) or 0), image=image,
                  max_positions=shape.max_positions)


def _probe_inputs(model: nn.Module, spec: IOSpec, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed, deterministic input: random tokens (never the pad id), the last row half padded."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    if spec.vision:
        out["pixel_values"] = torch.randn(batch, *spec.image, generator=gen)
    else:
        ids = torch.randint(0, spec.vocab, (batch, seq), generator=gen)
        if spec.pad_id is not None and 0 <= spec.pad_id < spec.vocab:
            ids[ids == spec.pad_id] = (spec.pad_id + 1) % spec.vocab
        out["input_ids"] = ids
        if "attention_mask" in spec.inputs:
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[-1, seq // 2 + 1:] = 0
            out["attention_mask"] = mask
        if "token_type_ids" in spec.inputs:
            out["token_type_ids"] = torch.randint(0, max(spec.type_vocab, 1), (batch, seq), generator=gen)
    return {k: v.numpy() for k, v in out.items()}      # floats stay fp32; runners cast to the model's dtype


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _tolerance(model: nn.Module) -> float:
    return TOLERANCE.get(_float_dtype(model), 1e-4)


def _run_torch(model: nn.Module, probe: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """The model's output on ``probe`` (CPU fp32) and its name: logits, else the last hidden state."""
    device, dtype = model_device(model), _float_dtype(model)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in probe.items()}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    try:
        out = model(**inputs)
    except Exception as err:
        raise ValueError(f"{type(model).__name__} fails on a probe batch of shape "
                         f"{tuple(next(iter(inputs.values())).shape)}: {err}") from err
    name = "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"
    return getattr(out, name).float().cpu().numpy(), name


class _OnnxWrapper(nn.Module):
    """Named tensor inputs in, one tensor out: the graph ONNX sees."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        given = dict(input_ids=input_ids, attention_mask=attention_mask,
                     token_type_ids=token_type_ids, pixel_values=pixel_values)
        return getattr(self.model(**{k: v for k, v in given.items() if v is not None}), self.output)


def _write_onnx(model: nn.Module, spec: IOSpec, path: Path) -> str:
    """Export to ``path``; returns which exporter produced it ("dynamo", else "legacy")."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from err
    device, dtype = model_device(model), _float_dtype(model)
    example = {k: torch.from_numpy(v).to(device) for k, v in
               _probe_inputs(model, spec, TRACE_BATCH, TRACE_SEQ, seed=1).items()}
    example = {k: v.to(dtype) if v.is_floating_point() else v for k, v in example.items()}
    wrapper = _OnnxWrapper(model, spec.output).eval()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    try:
        batch = torch.export.Dim("batch")
        if spec.vision:
            dynamic = {"pixel_values": {0: batch}}
        else:
            seq = torch.export.Dim("sequence", max=spec.max_positions) if spec.max_positions > TRACE_SEQ \
                else torch.export.Dim("sequence")
            dynamic = {name: {0: batch, 1: seq} for name in spec.inputs}
        program = torch.onnx.export(wrapper, (), kwargs=example, output_names=[spec.output],
                                    dynamic_shapes=dynamic, dynamo=True, verbose=False,
                                    external_data=big)
        program.save(str(path), external_data=big)
        return "dynamo"
    except Exception as dynamo_error:        # the verification below decides whether legacy is right
        _remove(path)
        axes = {name: ({0: "batch"} if spec.vision else {0: "batch", 1: "sequence"}) for name in spec.inputs}
        axes[spec.output] = {0: "batch"}
        try:
            torch.onnx.export(wrapper, tuple(example[name] for name in spec.inputs), str(path),
                              input_names=list(spec.inputs), output_names=[spec.output],
                              dynamic_axes=axes, dynamo=False, opset_version=17)
        except Exception as legacy_error:
            raise ValueError(f"ONNX export failed: dynamo exporter: {dynamo_error}; "
                             f"legacy exporter: {legacy_error}") from legacy_error
        return "legacy"


# --------------------------------------------------------------------------- verification

# Runs in a fresh interpreter (python -I: no cwd, no PYTHONPATH). The stock job runs first and checks
# that no project module was imported, so "loads with plain transformers" is tested, not assumed.
_CHILD = r"""
import json, sys
import numpy as np
folder, jobs, root = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
probe = dict(np.load(folder + "/.kcm_probe.npz"))
results, notes = {}, {}
for fmt, loader, output in jobs:
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
        feeds = {i.name: probe[i.name] for i in session.get_inputs()}
        results[fmt] = session.run(None, feeds)[0].astype(np.float32)
        continue
    import torch
    import transformers
    if loader == "transformers":
        cfg = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model = getattr(transformers, cfg.architectures[0]).from_pretrained(folder, local_files_only=True)
        notes["project_code_imported"] = any(m.split(".")[0] == "kcm_core" for m in sys.modules)
    else:
        sys.path.insert(0, root)
        from kcm_core.export import load_pruned
        model = load_pruned(folder)
    model.eval()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = {k: torch.from_numpy(v) for k, v in probe.items()}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        results[fmt] = getattr(model(**inputs), output).float().numpy()
np.savez(folder + "/.kcm_probe_out.npz", **results)
print(json.dumps(notes))
"""


def _verify(folder: Path, formats: tuple[str, ...], loader: str, spec: IOSpec,
            probe: Mapping[str, np.ndarray], expected: np.ndarray, tolerance: float) -> dict[str, float]:
    np.savez(folder / PROBE_FILE, **probe)
    jobs = [(fmt, loader if fmt == "hf" else "onnxruntime", spec.output) for fmt in formats]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(folder), json.dumps(jobs), root],
                          capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT_S)
    if done.returncode != 0:
        raise ValueError(f"the export in {folder.name} failed to reload in a fresh process:\n"
                         f"{done.stderr.strip()[-2000:]}")
    notes = json.loads(done.stdout.strip().splitlines()[-1] or "{}")
    if notes.get("project_code_imported"):
        raise ValueError("loading the uniform-width export with stock transformers imported kcm_core")
    got = dict(np.load(folder / PROBE_OUT_FILE))
    diffs: dict[str, float] = {}
    for fmt in formats:
        if got[fmt].shape != expected.shape:
            raise ValueError(f"{fmt} export: reloaded output has shape {got[fmt].shape}, "
                             f"the in-memory model gives {expected.shape}")
        diffs[fmt] = float(np.abs(got[fmt].astype(np.float64) - expected.astype(np.float64)).max()) \
            if expected.size else 0.0
        if not diffs[fmt] <= tolerance:
            raise ValueError(f"{fmt} export differs from the in-memory model by {diffs[fmt]:.3g} "
                             f"(max abs on the probe; tolerance {tolerance:g}); nothing was written")
    return diffs


# --------------------------------------------------------------------------- reports

def _write_reports(folder: Path, model: nn.Module, config, plan: KeepPlan | None,
                   report: Mapping[str, Any] | None, result: ExportResult, spec: IOSpec) -> None:
    if plan is not None:
        (folder / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    if report is not None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    widths = [block.width for block in ffn_blocks(model)]
    summary = {
        "formats": list(result.formats),
        "loader": result.loader,
        "onnx_exporter": result.onnx_exporter,
        "onnx_inputs": list(spec.inputs) if "onnx" in result.formats else None,
        "onnx_output": spec.output if "onnx" in result.formats else None,
        "verified_in_fresh_process": result.reloaded_ok,
        "max_abs_diff": result.max_abs_diff,
        "tolerance": result.tolerance,
        "probe_shape": [PROBE_BATCH] + ([*spec.image] if spec.vision else [PROBE_SEQ]),
        "kept_widths": widths,
        "relative_flops": _relative_flops(model, plan, report),
        "versions": _versions(),
    }
    (folder / EXPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (folder / REPORT_MD).write_text(_markdown(type(model).__name__, config, plan, report, summary))


def _relative_flops(model: nn.Module, plan: KeepPlan | None,
                    report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    achieved = (report or {}).get("relative_flops")
    if isinstance(achieved, Mapping) and "achieved" in achieved:
        return {"value": achieved["achieved"], "seq_len": (report or {}).get("seq_len"),
                "unit": achieved.get("unit", "encoder MACs, relative to the unpruned model")}
    seq_len = (plan.info.get("seq_len") if plan is not None else None)
    if plan is None or not seq_len:
        return None
    from .flops import relative_flops
    shape = replace(model_shape(model.config), ffn_width=tuple(plan.widths))
    return {"value": relative_flops(shape, float(seq_len), plan.kept_counts), "seq_len": seq_len,
            "unit": "encoder MACs at seq_len, relative to the unpruned model"}


def _versions() -> dict[str, str]:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def _markdown(class_name: str, config, plan: KeepPlan | None, report: Mapping[str, Any] | None,
              summary: Mapping[str, Any]) -> str:
    report = report or {}
    lines = [f"# Pruned {class_name}", ""]
    method = report.get("method") or (plan.method if plan is not None else "")
    if method:
        lines.append(f"- Method: `{method}`")
    source = (report.get("model") or {}).get("source") if isinstance(report.get("model"), Mapping) else None
    if source:
        lines.append(f"- Source model: `{source}`")
    flops = summary["relative_flops"]
    if flops:
        at = f" at sequence length {float(flops['seq_len']):.2f}" if flops.get("seq_len") else ""
        lines.append(f"- Relative FLOPs (encoder MACs{at}, FLOPs = 2 x MACs): {float(flops['value']):.3f}")
    widths = summary["kept_widths"]
    before = plan.widths if plan is not None else None
    kept = f"{sum(widths)}" + (f" of {sum(before)}" if before else "")
    lines.append(f"- FFN neurons kept: {kept}")
    evaluation = report.get("evaluation") or {}
    for when in ("before", "after"):
        acc = (evaluation.get(when) or {}).get("accuracy") if isinstance(evaluation, Mapping) else None
        if acc:
            lo, hi = acc["ci95"]
            lines.append(f"- Accuracy {when}: {acc['value']:.4f} (95% CI {lo:.4f} to {hi:.4f}, n={acc['n']})")
    lines += ["", "| layer | kept | of |", "|---|---|---|"]
    for i, w in enumerate(widths):
        lines.append(f"| {i} | {w} | {before[i] if before else ''} |")
    lines += ["", "## Loading", ""]
    if "hf" in summary["formats"]:
        if summary["loader"] == "transformers":
            lines += ["Every layer has the same width: plain `transformers` loads this folder.", "",
                      "```python", "import transformers",
                      "cfg = transformers.AutoConfig.from_pretrained(folder)",
                      "model = getattr(transformers, cfg.architectures[0]).from_pretrained(folder)", "```"]
        else:
            lines += ["Layers have different widths (`kcm_ffn_widths` in `config.json`); load with:", "",
                      "```python", "from kcm_core import load_pruned",
                      "model = load_pruned(folder)", "```"]
    if "onnx" in summary["formats"]:
        lines += ["", f"`{ONNX_FILE}` ({summary['onnx_exporter']} exporter): inputs "
                  f"{', '.join(f'`{n}`' for n in summary['onnx_inputs'])} with dynamic batch"
                  + ("" if summary["onnx_inputs"] == ["pixel_values"] else " and sequence")
                  + f" axes; output `{summary['onnx_output']}`.", "",
                  "```python", "import onnxruntime as ort",
                  f"session = ort.InferenceSession(folder + '/{ONNX_FILE}', providers=['CPUExecutionProvider'])",
                  "```"]
    lines += ["", "## Verification", ""]
    if summary["verified_in_fresh_process"]:
        diffs = ", ".join(f"{k}: {v:.2e}" for k, v in summary["max_abs_diff"].items())
        lines.append(f"Reloaded in a fresh process and compared with the in-memory model on a probe "
                     f"of shape {summary['probe_shape']}: max abs difference {diffs} "
                     f"(tolerance {summary['tolerance']:g}).")
    else:
        lines.append("Not verified (verify=False).")
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    lines += ["", f"Written with {versions}.", ""]
    return "\n".join(lines)

