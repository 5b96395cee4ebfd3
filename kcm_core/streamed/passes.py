"""Streamed pruning: score, select, scale, slice and save a model that does not fit in memory.

The model is never whole in memory: one transformer layer at a time is read from its safetensors
files (``kcm_core.streamed.skeleton``), run on the calibration hidden states, and emptied again. Peak memory is
about one layer (plus its masked and sliced copies in the second pass), the calibration hidden states,
and the embeddings and head while they are needed. The budget is global (the top k neurons pooled
over all layers), so a layer cannot be cut before every layer has been scored; hence two passes
over the layers, with the selection between them:

1. **Scores.** Layer by layer on the unpruned model's hidden states: the method's per-layer score
   (R2 on the layer's weights, activation statistics for D2, Wanda-sp, FLAP, ...), kept as one small
   vector per layer. Methods that read no data need no forward pass here.
2. **Selection**, on the pooled vectors, exactly as in memory (``kcm_core.pipeline.make_plan``).
3. **Scaling, slicing, writing.** Layer by layer again, carrying two sets of hidden states on the
   scaling sample: the unpruned model's (teacher: its FFN output is the target) and the pruned one's
   (student: earlier layers already pruned and scaled), as ``kcm_core.scaling`` does in memory. Each
   layer's scales are fitted, folded in, the layer is sliced and written to its own safetensors shard
   (FLAP's bias shift is computed here, from the layer's weights and the first pass's means). A Mistral
   or Qwen2 layer given a bias is written as the LLaMA class's layer (its zero biases added), and the
   config as LLaMA's (``kcm_core.bias_carrier``), as the in-memory export does.

The folder written is the in-memory export's format (``config.json`` with the new widths, a sharded
safetensors checkpoint with its index, the tokenizer, ``kcm_plan.json``, ``report.json``/``.md``,
``export.json``), so ``load_model``, ``load_pruned`` and stock ``from_pretrained`` (uniform widths)
load it the same way. It is checked before it is moved into place, also without holding the whole
model: a fixed probe is run through the freshly sliced layers during the second pass and again
through the written files, layer by layer, and the two outputs must agree (``export.probe.TOLERANCE``). Plans,
scales and outputs equal the in-memory path's to 1e-5 (``tests/test_stream.py``, every family).

Not streamed: methods that need gradients through the whole model (Mask-Tuning, KCM + labels) and
the evaluation of the pruned model (the CLI says so in its report).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..activations import NeuronStats, collect_stats
from ..arch import ffn_blocks, model_shape, set_ffn_width, transformer_layers
from ..atomic import atomic_folder, check_protected, check_replaceable, check_writable, disk_errors
from ..bias_carrier import carrier_family, carrier_note, empty_carrier_layer, layer_with_biases, moved_config
from ..compensation import can_carry_bias, check_compensable, compensate
from ..curves import error_curves
from ..flops import check_budget
from ..hull import HullConfig, HullFit, kernel_hull
from .skeleton import LayerCall, LayerView, Skeleton, layer_output, next_calls, saved_names
from ..methods import Method, MethodScores, ScoreDetails, score_with
from ..pipeline import PruneConfig, make_plan, resolve_seq_len
from ..plan import KeepPlan
from ..repair import RepairConfig, fit_repair
from ..realise import give_mlp_biases, mask_copy, record_widths, slice_model
from ..runtime import Batch, Progress, default_device, model_inputs, tell
from ..scaling import ScaleConfig, solve_layer, fold_scales, teacher_targets

STREAM_FILE_PATTERN = "model-{:05d}-of-{:05d}.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class StreamResult:
    """What a streamed run produced; the pruned model itself is only on disk, in ``out_dir``."""

    plan: KeepPlan
    seq_len: float
    seconds: dict[str, float]
    details: ScoreDetails
    out_dir: Path
    params_before: int
    params_after: int
    max_abs_diff: float                    # probe: written files vs the layers sliced in memory
    tolerance: float
    loader: str                            # "transformers" (uniform widths) or "kcm_core.load_pruned"
    files: tuple[str, ...] = field(default_factory=tuple)


def check_streamable(spec: Method) -> None:
    if spec.uses_labels:
        raise ValueError(f"method {spec.name!r} needs gradients through the whole model, which the "
                         "streamed mode does not compute; prune without --stream, or choose a label-free "
                         "method such as 'kcm'")


# --------------------------------------------------------------------------- first pass: scores

class _LayerSources:
    """One layer's score components (``methods.ScoreSources`` for a ``LayerView``), each at most once."""

    def __init__(self, view: LayerView, config: PruneConfig, batches: Sequence[Batch]):
        self.model, self.config, self._batches = view, config, batches
        self._cache: dict[str, Any] = {}

    def r2(self) -> tuple[list[torch.Tensor], list[HullFit]]:
        if "r2" not in self._cache:
            with torch.no_grad():
                fit = kernel_hull(ffn_blocks(self.model)[0].down_rows().detach(), self.config.hull)
            self._cache["r2"] = ([fit.scores], [fit])
        return self._cache["r2"]

    def stats(self) -> NeuronStats:
        if "stats" not in self._cache:
            self._cache["stats"] = collect_stats(self.model, self._batches)
        return self._cache["stats"]

    def grads(self):
        raise ValueError("the streamed mode computes no gradients")

    def curves(self, scores) -> list[torch.Tensor]:
        """This layer's refit-error curve: a second run of the layer over the calibration calls it was
        fed (``LayerView.again``), the outputs of the first kept for the next layer."""
        if "curves" not in self._cache:
            with self.model.again():
                self._cache["curves"] = error_curves(self.model, scores, self._batches, self.config.repair.damp)
        return self._cache["curves"]


class _WholeSources:
    """Sources for a method whose score is not per layer (it reads only the layer widths, e.g. Random):
    the empty model carries every shape."""

    def __init__(self, model, config: PruneConfig):
        self.model, self.config = model, config

    def _per_layer(self):
        raise ValueError("a score that reads weights or data is made layer by layer in the streamed mode; "
                         "mark its method per_layer=True in kcm_core.methods")

    def curves(self, scores):
        raise ValueError(f"the curve allocation reads each layer's activations; method {self.config.method!r} "
                         "is not scored layer by layer, so under --stream choose --allocation standardised")

    r2 = stats = grads = _per_layer


def _merge_stats(per_layer: list[NeuronStats]) -> NeuronStats:
    first = per_layer[0]
    return NeuronStats(*(tuple(s for st in per_layer for s in getattr(st, name))
                         for name in ("mean", "mean_abs", "rms")),
                       tokens=first.tokens, sequences=first.sequences,
                       var=tuple(s for st in per_layer for s in st.var))


def each_layer(sk: Skeleton, unlabeled: Sequence[Batch], *, run: bool, progress: Progress | None = None,
               what: str = "streamed scores") -> Iterator[LayerView]:
    """Every layer of ``sk`` in turn, filled from the checkpoint as a one-layer ``LayerView`` and
    emptied again after the caller's step. With ``run``, each view is fed the calibration hidden states
    that reach its layer (the caller must run it on every batch, as ``collect_stats`` does); its outputs
    feed the next layer."""
    calls: list[LayerCall] = []
    if run:
        outside = sk.load_outside_layers(head=False)
        try:
            calls = sk.layer_inputs(unlabeled)
        finally:
            outside.free()
    count = len(sk.layers)
    for index in range(count):
        tell(progress, f"{what}: layer {index + 1}/{count}", index / count)
        loaded = sk.load_layer(index)
        try:
            view = LayerView(sk.config, sk.layers_path, loaded.module).feed(calls)
            yield view
            if run:
                calls = next_calls(calls, view.outputs)
        finally:
            loaded.free()
    tell(progress, f"{what}: done", 1.0)


def score_streamed(sk: Skeleton, config: PruneConfig, unlabeled: Sequence[Batch],
                   progress: Progress | None = None) -> MethodScores:
    """The first pass: every layer's scores, one layer in memory at a time (see the module doc)."""
    spec = config.spec
    start = time.perf_counter()
    if not spec.per_layer:
        result = score_with(spec, _WholeSources(sk.model, config))
        return replace(result, seconds={"scoring": time.perf_counter() - start})
    if config.resolved_repair.kind in ("bias", "scales+bias"):
        check_compensable(sk.model)               # before any scoring work
    scores, fits, stats, curves = [], [], [], []
    with_curves = config.resolved_allocation == "curve"
    for view in each_layer(sk, unlabeled, run="stats" in spec.needs or with_curves, progress=progress):
        sources = _LayerSources(view, config, unlabeled)
        layer_scores = score_with(spec, sources)
        scores.append(layer_scores.scores[0])
        if with_curves:
            curves.append(layer_scores.curves[0])
        if "r2" in spec.needs:
            fits.append(sources.r2()[1][0])
        if "stats" in spec.needs:
            stats.append(sources.stats())
    merged = _merge_stats(stats) if stats else None
    return MethodScores(spec.name, scores, None, list(merged.mean) if merged is not None else None,
                        ScoreDetails.of(fits or None, merged),
                        {"scoring": time.perf_counter() - start}, curves if with_curves else None)


def r2_streamed(sk: Skeleton, config: HullConfig,
                progress: Progress | None = None) -> tuple[list[torch.Tensor], list[HullFit]]:
    """R2 of every layer (``scores.r2``'s result), one layer in memory at a time; reads no data."""
    fits = []
    for view in each_layer(sk, (), run=False, progress=progress, what="R2 (kernel hull), layer by layer"):
        with torch.no_grad():
            fits.append(kernel_hull(ffn_blocks(view)[0].down_rows().detach(), config))
    return [fit.scores for fit in fits], fits


def stats_streamed(sk: Skeleton, unlabeled: Sequence[Batch], progress: Progress | None = None) -> NeuronStats:
    """Every neuron's activation statistics on ``unlabeled`` (``collect_stats``'s result), running the
    calibration hidden states through one layer at a time."""
    if not unlabeled:
        raise ValueError("activation statistics need unlabeled data, and none was given")
    per_layer = [collect_stats(view, unlabeled) for view in
                 each_layer(sk, unlabeled, run=True, progress=progress, what="activations, layer by layer")]
    return _merge_stats(per_layer)


def layer_rows_streamed(sk: Skeleton, index: int) -> torch.Tensor:
    """Layer ``index``'s down-projection rows (N, d) as a float32 copy, read alone from the checkpoint."""
    if not 0 <= index < len(sk.layers):
        raise ValueError(f"layer must be in [0, {len(sk.layers) - 1}], got {index}")
    loaded = sk.load_layer(index)
    try:
        view = LayerView(sk.config, sk.layers_path, loaded.module)
        with torch.no_grad():
            return ffn_blocks(view)[0].down_rows().detach().float().cpu().clone()
    finally:
        loaded.free()


# --------------------------------------------------------------------------- second pass: scale, slice, write

def _fit_layer(view: LayerView, plan: KeepPlan, batches: Sequence[Batch], teacher: list[LayerCall],
               student: list[LayerCall], config: ScaleConfig, last: bool):
    """One layer of ``scaling.fit_scales``: its scales (None: the solve failed, scaling stops here) and
    the next layer's teacher and student calls."""
    layer = plan.layers[0]
    targets = teacher_targets(view.feed(teacher), batches)
    next_teacher = [] if last else next_calls(teacher, view.outputs)
    view.feed([])                                    # nothing recorded is copied with the layer
    masked = mask_copy(view, plan.without_scales(), carry=False)
    scales: list[float] = []
    if layer.kept > 0:
        block = ffn_blocks(masked)[0]
        _, layers = transformer_layers(masked)
        device = block.down.weight.device
        s = solve_layer(masked.feed(student), layers, 0, block, layer.keep_idx, batches, None,
                        targets[0].to(device), config)
        if s is None:
            return None, [], []
        scales = s.cpu().tolist()
        fold_scales(block, layer.keep_idx, s)        # as fit_scales does, for the next layer
    return scales, next_teacher, [] if last else _next_student(masked, student, batches)


def _repair_layer(view: LayerView, plan: KeepPlan, batches: Sequence[Batch], teacher: list[LayerCall],
                  student: list[LayerCall], repair: RepairConfig, config: PruneConfig, last: bool):
    """One layer of ``repair.fit_repair`` (any repair but the paper's scaling and FLAP's bias): the
    layer's repaired plan and the next layer's teacher and student calls (no teacher for the local
    target, which needs only the pruned model's own inputs)."""
    targets, next_teacher = None, []
    if repair.target == "teacher":
        targets = teacher_targets(view.feed(teacher), batches)
        next_teacher = [] if last else next_calls(teacher, view.outputs)
    view.feed([])                                    # nothing recorded is copied with the layer
    repaired = fit_repair(view.feed(student), plan, batches, repair, ridge=config.scale.ridge,
                          bound=config.scale.bound, targets=targets)
    view.feed([])
    return repaired, next_teacher, [] if last else _next_student(mask_copy(view, repaired, carry=False),
                                                                 student, batches)


def _next_student(masked, student: list[LayerCall], batches: Sequence[Batch]) -> list[LayerCall]:
    """The next layer's student calls: this layer's pruned and repaired copy run on its student calls."""
    masked.feed(student)
    with torch.no_grad():
        for batch in batches:
            masked(**model_inputs(batch, _device_of(masked)))
    return next_calls(student, masked.outputs)


def _device_of(model) -> torch.device:
    return ffn_blocks(model)[0].down.weight.device


def _probe(sk: Skeleton):
    """The export's fixed probe batch for this model, and the name of the output compared."""
    from ..export.probe import PROBE_BATCH, PROBE_SEQ, io_spec, probe_inputs
    spec = io_spec(sk.model)
    arrays = probe_inputs(sk.model, spec, PROBE_BATCH, PROBE_SEQ, seed=0)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _model_output(outputs) -> torch.Tensor:
    out = outputs[0]
    value = getattr(out, "logits", None)
    return (value if value is not None else out.last_hidden_state).float().cpu()


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> int:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _slice_and_write(sk: Skeleton, config: PruneConfig, plan: KeepPlan, means,
                     unlabeled: Sequence[Batch], folder: Path, progress: Progress | None):
    """The second pass. Returns the plan with scales and bias shifts, the probe batch, the sliced
    model's output on it, the weight map, and the bytes and parameters written."""
    count = len(sk.layers)
    repair = config.resolved_repair
    step = repair.step                               # the in-memory repair_plan's choice, layer by layer
    fitted = step in ("scales", "fit")               # fitted on data, layer by layer
    batches = config.repair_sample(unlabeled) if fitted else []
    probe = _probe(sk)
    outside = sk.load_outside_layers(head=False)
    teacher = sk.layer_inputs(batches) if batches else []
    probe_calls = sk.layer_inputs([probe])
    outside.free()
    student = teacher
    has_shift = adds_bias(sk, repair, plan)
    carried = writes_carrier(sk, repair, plan)
    carrier_layer = empty_carrier_layer(sk.config, type(sk.model).__name__) if carried else None
    scales: list[list[float] | None] = [None] * count
    repaired_info: dict = {}
    stopped_at = None
    active = bool(batches)
    layers = []
    weight_map: dict[str, str] = {}
    size = params = 0
    # A folder stock from_pretrained loads gets the names stock save_pretrained writes (transformers 5
    # renames ViT's tensors on load and back on save); one for load_pruned keeps the model's own, as the
    # in-memory export does.
    stock = stock_loadable(sk, plan.kept_counts)
    for index in range(count):
        tell(progress, f"streamed scaling and slicing: layer {index + 1}/{count}", index / count)
        loaded = sk.load_layer(index)
        try:
            view = LayerView(sk.config, sk.layers_path, loaded.module)
            layer_plan = KeepPlan((plan.layers[index],), method=plan.method, info=plan.info)
            if step == "compensate":
                layer_plan = compensate(view, layer_plan, [means[index]])
            elif step == "fit":
                layer_plan, teacher, student = _repair_layer(view, layer_plan, batches, teacher, student,
                                                             repair, config, last=index == count - 1)
                for key in ("repair_failed_layers", "repair_errors"):
                    value = getattr(layer_plan.info, key) or []
                    repaired_info.setdefault(key, []).extend(
                        [index + v for v in value] if key == "repair_failed_layers" else value)
                repaired_info["repair_intercept"] = layer_plan.info.repair_intercept
            elif step == "scales" and active:
                s, teacher, student = _fit_layer(view, layer_plan, batches, teacher, student, config.scale,
                                                 last=index == count - 1)
                if s is None:
                    stopped_at, active = index, False
                else:
                    scales[index] = s
                    layer_plan = layer_plan.with_scales([s])
            layers.append(layer_plan.layers[0])
            sliced = slice_model(view.feed([]), layer_plan, carry=False)
            if has_shift:
                give_mlp_biases(sliced, sk.family)
            new_layer = sliced.get_submodule(sk.layers_path)[0]
            with torch.no_grad():
                args, kwargs = probe_calls[0]
                probe_calls = next_calls(probe_calls, [layer_output(new_layer(*args, **kwargs))])
            name = STREAM_FILE_PATTERN.format(index + 1, count + 1)
            state = new_layer.state_dict()
            if carried:          # the carrier's zero biases (Qwen2's O projection, the gate and up)
                state = layer_with_biases(state, carrier_layer)
            tensors = {sk.layer_prefix(index) + k: v for k, v in state.items()}
            if stock:
                tensors = saved_names(sk.model, tensors)
            size += _write_shard(tensors, folder / name)
            params += sum(t.numel() for t in state.values())
            weight_map.update(dict.fromkeys(tensors, name))
            del sliced, new_layer, tensors
        finally:
            loaded.free()
    outside = sk.load_outside_layers()
    try:
        expected = _model_output(sk.finish([probe], [probe_calls[0][0][0]]))
        name = STREAM_FILE_PATTERN.format(count + 1, count + 1)
        tensors = sk.outside_layer_tensors()
        if stock:
            tensors = saved_names(sk.model, tensors)
        size += _write_shard(tensors, folder / name)
        params += sum(t.numel() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    finally:
        outside.free()
    info: dict = repair.plan_info()
    if step == "scales":
        info.update(scaled_layers=sum(1 for s in scales if s is not None), scaling_stopped_at=stopped_at,
                    scale_ridge=config.scale.ridge)
    elif repaired_info:
        info.update(repaired_info, repair_failed_layers=repaired_info.get("repair_failed_layers") or None)
    new_plan = KeepPlan(tuple(layers), method=plan.method, info=plan.info.updated(**info))
    return new_plan, probe, expected, weight_map, size, params


def adds_bias(sk: Skeleton, repair: RepairConfig, plan: KeepPlan) -> bool:
    """Whether the second pass gives the down-projections biases (it writes each layer before the
    plan is complete, so this is decided from the repair and the selection, as the in-memory plan's
    ``has_bias_shift`` turns out)."""
    if repair.step == "compensate":                 # FLAP's: only layers that drop neurons
        return any(layer.kept < layer.width for layer in plan.layers)
    # fit_repair gives every layer its bias (or intercept)
    return repair.kind in ("bias", "scales+bias") or (repair.kind in ("refit", "obs") and can_carry_bias(sk.model))


def writes_carrier(sk: Skeleton, repair: RepairConfig, plan: KeepPlan) -> bool:
    """Whether the layers are written as the carrier class (``kcm_core.bias_carrier``: a Mistral or
    Qwen2 model given MLP biases is written as LLaMA)."""
    return adds_bias(sk, repair, plan) and carrier_family(sk.config) is not None


def stock_loadable(sk: Skeleton, widths: Sequence[int]) -> bool:
    """Whether the folder written for these kept widths loads with stock ``from_pretrained`` (one
    width for every layer, and no emptied GPT-2 Conv1D layer), as ``_write_config`` records it."""
    config = copy.deepcopy(sk.config)
    return (len(set(widths)) == 1 and set_ffn_width(config, sk.family, widths[0])
            and not (sk.family.transposed and 0 in widths))


def _write_config(sk: Skeleton, plan: KeepPlan, folder: Path, carried: bool) -> str:
    """config.json with the kept widths (and the MLP-bias switch FLAP's shift needs, or the carrier
    class's config when the layers were written as that class); returns the loader."""
    config = moved_config(sk.config, type(sk.model).__name__) if carried else copy.deepcopy(sk.config)
    widths = plan.kept_counts
    record_widths(config, sk.family, widths)
    if plan.has_bias_shift and sk.family.mlp_bias_field:
        setattr(config, sk.family.mlp_bias_field, True)
    # realise.py swaps in its own module class for emptied GPT-2 Conv1D layers: stock code cannot run them
    if sk.family.transposed and 0 in widths and not getattr(config, "kcm_ffn_widths", None):
        config.kcm_ffn_widths = list(widths)
    if not carried:
        config.architectures = [type(sk.model).__name__]
    config.save_pretrained(str(folder))
    generation = sk.folder / "generation_config.json"
    if generation.exists():
        (folder / generation.name).write_bytes(generation.read_bytes())
    return "kcm_core.load_pruned" if getattr(config, "kcm_ffn_widths", None) else "transformers"


def _reload_output(folder: Path, probe: Batch, device: torch.device) -> torch.Tensor:
    """The written folder's output on ``probe``, read back layer by layer (never whole in memory)."""
    sk = Skeleton(folder, device)
    outside = sk.load_outside_layers(head=False)
    calls = sk.layer_inputs([probe])
    outside.free()
    for index in range(len(sk.layers)):
        loaded = sk.load_layer(index)
        try:
            view = LayerView(sk.config, sk.layers_path, loaded.module).feed(calls)
            with torch.no_grad():
                view()
            calls = next_calls(calls, view.outputs)
        finally:
            loaded.free()
    outside = sk.load_outside_layers()
    try:
        return _model_output(sk.finish([probe], [calls[0][0][0]]))
    finally:
        outside.free()


def prune_streamed(model_dir: str | os.PathLike, config: PruneConfig, unlabeled: Sequence[Batch],
                   out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
                   device: torch.device | str | None = None, progress: Progress | None = None,
                   protected: Sequence[str | os.PathLike] = (),
                   report: Callable[[StreamResult, Skeleton], Any] | None = None,
                   scores: MethodScores | None = None) -> StreamResult:
    """Prune the model saved in ``model_dir`` without loading it whole, writing it to ``out_dir``.

    Same options, plan, scales and output as ``pipeline.prune`` followed by ``export.save_pruned``
    (see the module doc for the passes). ``report(result, skeleton)``, when given, returns a
    ``kcm_core.report.PruneReport`` written beside the weights. ``scores``: ``config.method``'s scores
    of this model on ``unlabeled``, computed already (the app keeps them), in place of the first pass.
    ``out_dir`` is written atomically: on any failure nothing is left. ``model_dir`` itself is never
    changed.
    """
    from ..export.probe import TOLERANCE
    from ..export.saving import EXPORT_MARKERS
    unlabeled = list(unlabeled)
    out_dir = Path(out_dir).expanduser()
    spec = config.spec
    check_streamable(spec)
    if (spec.uses_data or config.resolved_repair.kind != "none") and not unlabeled:
        raise ValueError(f"method {spec.name!r} needs unlabeled data, and none was given")
    check_protected(out_dir, [*protected, model_dir])
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ValueError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite)")
        check_replaceable(out_dir, EXPORT_MARKERS, kind="export")
    check_writable(out_dir)
    device = torch.device(device) if device is not None else default_device()
    sk = Skeleton(model_dir, device)
    shape = model_shape(sk.config)
    seq_len = resolve_seq_len(shape, unlabeled, config.seq_len)
    check_budget(shape, seq_len, config.budget)             # before any scoring work
    if config.resolved_repair.kind in ("bias", "scales+bias"):
        check_compensable(sk.model)
    seconds: dict[str, float] = {}
    if scores is not None and (scores.method != spec.name or len(scores.scores) != len(sk.layers)):
        raise ValueError(f"the scores given are {scores.method!r}'s for {len(scores.scores)} layers, not "
                         f"{spec.name!r}'s for this model's {len(sk.layers)}")
    scored = scores if scores is not None else score_streamed(sk, config, unlabeled, progress)
    seconds.update(scored.seconds or {})
    means = scored.means
    if means is None and config.resolved_repair.step == "compensate":      # as kcm_core.pipeline.prune
        means = list(stats_streamed(sk, unlabeled, progress).mean)
    start = time.perf_counter()
    plan = make_plan(sk.model, scored, config, seq_len)     # the in-memory selection, on the pooled scores
    seconds["selection"] = time.perf_counter() - start
    params_before = sum(p.numel() for p in sk.model.parameters())
    with disk_errors(out_dir), atomic_folder(out_dir, overwrite=overwrite, markers=EXPORT_MARKERS) as tmp:
        start = time.perf_counter()
        plan, probe, expected, weight_map, size, params_after = _slice_and_write(
            sk, config, plan, means, unlabeled, tmp, progress)
        plan = replace(plan, info=plan.info.updated(seq_len=seq_len))
        seconds["scaling_slicing_writing"] = time.perf_counter() - start
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size},
                                                  "weight_map": weight_map}, indent=2) + "\n")
        carried = writes_carrier(sk, config.resolved_repair, plan)
        loader = _write_config(sk, plan, tmp, carried)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        tell(progress, "streamed export: reading the written files back", 0.95)
        got = _reload_output(tmp, probe, device)
        tolerance = max(TOLERANCE.get(dtype, 1e-4) for dtype in weight_dtypes(tmp))
        diff = float((got.double() - expected.double()).abs().max()) if expected.numel() else 0.0
        if got.shape != expected.shape or not diff <= tolerance:
            raise ValueError(f"the written model differs from the layers sliced in memory by {diff:.3g} on "
                             f"the probe (tolerance {tolerance:g}); nothing was written")
        result = StreamResult(plan, seq_len, seconds, scored.details, out_dir, params_before, params_after,
                              diff, tolerance, loader)
        note = carrier_note(moved_config(sk.config, type(sk.model).__name__)) if carried else None
        _write_reports(tmp, sk, result, report(result, sk) if report is not None else None, note)
        result.files = tuple(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    tell(progress, "streamed export: done", 1.0)
    return result


def weight_dtypes(folder: Path) -> set[torch.dtype]:
    """The floating dtypes of a written folder's tensors (read from the headers only)."""
    from safetensors import safe_open
    dtypes = set()
    for name in sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values())):
        with safe_open(str(folder / name), framework="pt", device="cpu") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                dtypes.add({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                            "F64": torch.float64}.get(dtype, torch.float32))
    return dtypes or {torch.float32}


def _write_reports(folder: Path, sk: Skeleton, result: StreamResult, report, class_note: str | None) -> None:
    """``kcm_plan.json``, ``report.json`` + ``report.md`` (when a report is given), ``export.json``;
    ``class_note``: why the written class is not the model's own (``kcm_core.bias_carrier``), if it is not."""
    from ..export.files import EXPORT_FILE, PLAN_FILE, REPORT_FILE, REPORT_MD
    from ..report import Environment, render_markdown
    (folder / PLAN_FILE).write_text(json.dumps(result.plan.to_dict(), indent=1) + "\n")
    summary = {
        "formats": ["hf"],
        "loader": result.loader,
        "streamed": True,
        "verified_in_fresh_process": False,
        "verified_streamed": True,
        "max_abs_diff": {"hf": result.max_abs_diff},
        "tolerance": result.tolerance,
        "kept_widths": result.plan.kept_counts,
        "class_note": class_note,
        "environment": Environment.here().__dict__,
    }
    (folder / EXPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    lines = [render_markdown(report) if report is not None
             else f"# Pruned {type(sk.model).__name__} (streamed)\n\nNo run report was given.\n"]
    lines += ["## Loading", ""]
    if class_note:
        lines += [class_note, ""]
    if result.loader == "transformers":
        lines += ["Every layer has the same width: plain `transformers` loads this folder.", ""]
    else:
        lines += ["The FFN widths are recorded in `kcm_ffn_widths` (`config.json`), which stock `transformers` "
                  "does not read (layers of different widths, or a width the stock config cannot state, as "
                  "DINOv2's integer `mlp_ratio`); load with `kcm_core.load_pruned(folder)`.", ""]
    lines += ["## Verification", "",
              f"Written layer by layer (streamed mode), then read back layer by layer and run on a fixed "
              f"probe: max abs difference {result.max_abs_diff:.2e} from the layers sliced in memory "
              f"(tolerance {result.tolerance:g}). Not reloaded whole in a fresh process, since the model "
              "may not fit in memory.", ""]
    (folder / REPORT_MD).write_text("\n".join(lines))
    if report is not None:
        (folder / REPORT_FILE).write_text(report.to_json() + "\n")
