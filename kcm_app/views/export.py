"""Page 6 body: physically prune, save (Hugging Face folder and/or ONNX), download with a report."""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import streamlit as st

from kcm_core.flops import cost_report
from kcm_core.methods import METHODS
from kcm_core.realise import slice_model

from .. import charts, engine, figures, report, resources, server, state, ui
from ..engine import Workspace

ZIP_LIMIT = 512 * 2**20      # offer a zip download up to this size
T = TypeVar("T")


def zip_folder(folder: Path, files: Sequence[str]) -> bytes:
    """The export just written: exactly ``files`` (``ExportResult.files``, relative to ``folder``),
    skipping links and anything that resolves outside ``folder``, so nothing else on the server is
    ever copied into the download."""
    root = folder.resolve()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            path = folder / name
            if path.is_symlink() or not path.is_file() or root not in path.resolve().parents:
                continue
            zf.write(path, Path(folder.name) / name)
    return buffer.getvalue()


def written_size(folder: Path, files: Sequence[str]) -> int:
    return sum((folder / name).stat().st_size for name in files
               if (folder / name).is_file() and not (folder / name).is_symlink())


def page_figures(ws: Workspace, result: engine.BudgetResult) -> dict:
    cost = cost_report(ws.shape, ws.seq_len, kept=result.plan.kept_counts)
    figs = {"Kept neurons per layer": figures.kept_per_layer(charts.kept_frame(result.plan), result.method),
            "Cost of the pruned model per block": figures.stacked_blocks(
                charts.cost_frame(cost, "MMACs"), "value",
                f"MMACs per {'block' if ws.is_lm else 'image' if ws.shape.vision else 'sequence'}",
                f"Pruned model at s = {ws.seq_len:g} tokens"
                + (" per block" if ws.is_lm else " per image" if ws.shape.vision else ""))}
    return figs


def page() -> None:
    """The whole page: title, the loaded workspace (or why there is none), the controls, the body."""
    st.title("Export")
    st.caption("Slice the model at the Prune page's method and budget, save it to a folder on this machine, "
               "and download it with a report of what was done.")
    ws = ui.require_workspace()
    body(ws, *controls())


def controls() -> tuple[str, list[str], bool, bool, bool]:
    """Output folder, formats, overwrite, uniform widths, and whether 'Prune and save' was pressed."""
    left, mid, right = st.columns([3, 2, 1])
    out_dir = left.text_input("Output folder", f"out/kcm-{state.method()}-{state.budget():.2f}", key="export_dir",
                              help="Created on this machine; refused if it exists unless you tick Overwrite")
    formats = mid.multiselect("Formats", ["hf", "onnx"], ["hf"], key="export_formats",
                              help="hf: safetensors + config (stock from_pretrained when widths are uniform); "
                                   "onnx: loads anywhere")
    overwrite = right.checkbox("Overwrite", key="export_overwrite",
                               help="Replace an existing folder, only if it holds an earlier export")
    uniform = right.checkbox("Uniform widths", key="export_uniform",
                             help="Every layer keeps the same number of neurons, so stock transformers "
                                  "(AutoModelForCausalLM, AutoModelForSequenceClassification, "
                                  "AutoModelForImageClassification) loads the export "
                                  "with no project code; per-layer widths need kcm_core.load_pruned")
    go = st.button("Prune and save", type="primary", key="export_go",
                   help="Slices the model physically, saves it, reloads it to check, and offers a zip")
    return out_dir, formats, overwrite, uniform, go


def export_target(out_dir: str) -> Path | None:
    """The absolute folder the export will write, shown under the button; None (with the reason
    shown instead) when a shared server refuses it."""
    try:
        target = server.export_folder(out_dir)             # confined on a shared server
    except ValueError as err:
        st.warning(str(err))
        return None
    exists = " It exists: tick Overwrite to replace it (only an earlier export is replaced)." if target.exists() else ""
    st.caption(f"Writes to `{target}` on this machine.{exists}")
    return target


def body(ws: Workspace, out_dir: str, formats: list[str], overwrite: bool, uniform: bool, go: bool) -> None:
    target = export_target(out_dir)
    if ws.streamed:
        layerwise_body(ws, target, formats, overwrite, go)
        return
    config = ui.prune_config(uniform=uniform)
    store = resources.store("results")
    st.markdown(f"**{METHODS[config.method].label}** at **{config.budget:.2f}** relative FLOPs (set on the Prune page)"
                + (", every layer the same width." if uniform else "."))
    with ui.progress("Preparing the plan") as bar, ui.core_errors():
        result = engine.evaluate_budget(ws, config, store, bar)
        reference = engine.reference(ws, store) if ws.eval_batches is not None and not ws.is_lm else None
        dense = reference.accuracy if reference is not None else None
        dense_lm = engine.reference_lm(ws, store) if ws.is_lm else None
        speed = engine.measure_speed(ws, config, store)
    data = report.build_report(ws, config, result, dense, speed, dense_lm,
                               dense_hits=reference.hits if reference is not None else None)
    name = f"kcm-{config.method}-{config.budget:.2f}"
    cols = st.columns(3)
    cols[0].download_button("Report (JSON)", report.report_json(data), f"{name}.json", "application/json",
                            key="dl_report_json", help="Plan, numbers and environment")
    cols[1].download_button("Report (Markdown)", report.report_markdown(data), f"{name}.md", "text/markdown",
                            key="dl_report_md", help="The same report for people")
    cols[2].download_button("Figures (HTML)", report.figures_html(page_figures(ws, result), name),
                            f"{name}-figures.html", "text/html", key="dl_figures",
                            help="Interactive figures in one offline HTML file")
    with st.container(border=True):
        st.markdown(report.report_markdown(data, heading="####"))
    if not go or target is None:
        last_export(target)
        return
    if not formats:
        st.error("Choose at least one export format.")
        return
    from kcm_core.export import save_pruned

    def write(bar):
        pruned = slice_model(ws.model, result.plan)        # a new model; the shared one is untouched
        return save_pruned(pruned, target, plan=result.plan, report=data, tokenizer=ws.tokenizer,
                           formats=tuple(formats), overwrite=overwrite, progress=bar,
                           protected=[ws.info.data_source])
    summary = with_status(target, f"Slicing and saving to {target}", write)
    if summary is None:
        return
    done(target, summary.files, f"Saved to {target} and checked.",
         json.dumps(asdict(summary) if is_dataclass(summary) else dict(summary), default=str))


def layerwise_body(ws: Workspace, target: Path | None, formats: list[str], overwrite: bool, go: bool) -> None:
    """A model opened layer by layer: the plan's counts now; on 'Prune and save', scaled, sliced and
    written one layer at a time (``kcm_core.streamed.passes.prune_streamed``), checked on a probe against the
    layers sliced in memory, with the report beside the weights (without an evaluation)."""
    config = ui.prune_config()
    store = resources.store("results")
    label = METHODS[config.method].label
    st.markdown(f"**{label}** at **{config.budget:.2f}** relative FLOPs (set on the Prune page).")
    with ui.progress(f"Scoring with {label}") as bar, ui.core_errors():
        scores = engine.method_scores(ws, config, store, bar)
        fast = engine.readout(ws, scores, config, store)
    st.caption(f"Keeps {fast.neurons_kept:,} of {fast.neurons_total:,} FFN neurons: {fast.relative_flops:.1%} "
               f"of the FLOPs, {fast.params_after:,} of {fast.params_before:,} parameters.")
    ui.layerwise_note(ws, "evaluating and timing the pruned model (its report says it was not evaluated)")
    if not go or target is None:
        last_export(target)
        return
    if formats != ["hf"]:
        st.error("Layer by layer writes the hf format only: choose hf alone, and convert the pruned folder to "
                 "ONNX afterwards with `python -m kcm_core export` where it fits in memory.")
        return
    from kcm_core.streamed.passes import prune_streamed
    result = with_status(target, f"Scaling, slicing and saving layer by layer to {target}", lambda bar: prune_streamed(
        ws.stream_dir, config, ws.unlabeled, target, tokenizer=ws.tokenizer, overwrite=overwrite, progress=bar,
        protected=[ws.info.data_source], report=lambda done, _sk: report.layerwise_report(ws, config, done),
        scores=scores))
    if result is None:
        return
    done(target, result.files,
         f"Written layer by layer and read back: the probe's largest difference from the layers sliced in "
         f"memory is {result.max_abs_diff:.2g} (tolerance {result.tolerance:g}). Load it with "
         f"{'transformers (from_pretrained)' if result.loader == 'transformers' else 'kcm_core.load_pruned'}.",
         json.dumps({"out_dir": str(result.out_dir), "files": list(result.files), "seconds": result.seconds,
                     "max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance, "loader": result.loader}))


def done(target: Path, files: Sequence[str], message: str, summary: str) -> None:
    """Kept for this session and drawn: the export's message, its summary and the download."""
    state.set_exported((str(target), tuple(files), message, summary))
    last_export(target)


def last_export(target: Path | None) -> None:
    """The session's last export when it wrote ``target`` and the folder is still there: a rerun (the
    background work finishing, another widget) must not take its message and download away."""
    record = state.exported()
    if record is None or target is None or record[0] != str(target) or not target.is_dir():
        return
    _, files, message, summary = record
    st.success(message)
    st.json(summary, expanded=False)
    offer_download(target, files)


def with_status(target: Path, label: str, write: Callable[[ui.ProgressBar], T]) -> T | None:
    """``write(progress)`` inside a status box titled ``label``: "Saved to" once it is done; on a clear
    error (nothing is left behind: exports are atomic) the box says it failed, the error is shown in
    the page's words, and None is returned."""
    from kcm_core.errors import clear_error_types, one_line
    with st.status(label, expanded=True) as box:
        bar = ui.ProgressBar("Exporting", container=box.empty())
        try:
            written = write(bar)
        except clear_error_types() as err:
            bar.clear()
            box.update(label=f"Export to {target} failed", state="error", expanded=False)
            st.error(app_wording(one_line(err)))
            return None
        bar.clear()
        box.update(label=f"Saved to {target}", state="complete", expanded=False)
    return written


def offer_download(target: Path, files: Sequence[str]) -> None:
    """A zip of what the export wrote, when it is small enough to hand to a browser."""
    size = written_size(target, files)
    if size <= ZIP_LIMIT:
        with st.spinner(f"Packing {size / 2**20:.0f} MiB into a zip for the download..."):
            packed = zip_folder(target, files)
        st.download_button("Download the pruned model (zip)", packed, f"{target.name}.zip", "application/zip",
                           key="dl_model", help="Everything this export wrote to the folder")
    else:
        st.info(f"The folder holds {size / 2**20:.0f} MiB; copy it from {target} on this machine.")


def app_wording(message: str) -> str:
    """A core message in the page's words (the core speaks to callers and the CLI)."""
    return message.replace("pass overwrite=True (CLI: --overwrite)", "tick Overwrite to replace it")
