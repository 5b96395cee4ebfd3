"""Page 2 body: per-block cost, the formula, the FFN share, measured latency per block."""
from __future__ import annotations

import streamlit as st

from kcm_core.arch import ModelShape
from kcm_core.flops import cost_report, count_params

from .. import charts, engine, figures, resources, ui
from ..engine import Workspace
from ..latency import block_latency

def stack_name(shape: ModelShape) -> str:
    """What the counted layers are called: "decoder" for a causal stack, else "encoder"."""
    return "decoder" if shape.decoder else "encoder"


def formula(shape: ModelShape) -> str:
    """The MAC formula that ``kcm_core.flops`` applies to this architecture: grouped-query attention
    shares K and V between ``H / H_kv`` query heads; a gated MLP (gate, up, down) has three matrices."""
    if shape.kv_heads != shape.heads:
        head = r"\left(2 + 2\,\tfrac{H_{kv}}{H}\right) s\,d\,d_h + 2\,s^2 d_h"
    else:
        head = r"4\,s\,d\,d_h + 2\,s^2 d_h"
    return (rf"\mathrm{{MAC}}_{{\mathrm{{head}}}} = {head},\qquad "
            rf"\mathrm{{MAC}}_{{\mathrm{{neuron}}}} = {3 if shape.gated else 2}\,s\,d,\qquad "
            r"\mathrm{MAC} = \sum_l \left(H\,\mathrm{MAC}_{\mathrm{head}} + N_l\,\mathrm{MAC}_{\mathrm{neuron}}\right)")


def image_tokens(config) -> str:
    """How a ViT's tokens per image follow from its image and patch size: "(84/14)^2 + 1 = 37"."""
    size, patch = int(config.image_size), int(config.patch_size)
    return f"({size}/{patch})^2 + 1 = {(size // patch) ** 2 + 1}"


def formula_note(shape: ModelShape, seq_len: float, lm: bool, config=None) -> str:
    """What the symbols are for this architecture, and what is counted (``config``: the model's, for
    an image model's tokens per image)."""
    heads = (f"H = {shape.heads} query heads, H_kv = {shape.kv_heads} key/value heads (grouped-query "
             "attention)" if shape.kv_heads != shape.heads else f"H = {shape.heads} heads")
    ffn = "MLP" if lm else "FFN"
    matrices = (f"{ffn} neurons per layer (gated: gate, up and down, three matrices)" if shape.gated
                else f"{ffn} neurons per layer (up and down, two matrices)")
    if shape.vision:
        where = (f"s = {image_tokens(config)} tokens per image (one per {config.patch_size} x "
                 f"{config.patch_size} pixel patch of the {config.image_size} x {config.image_size} input, plus "
                 "the class token)" if config is not None else f"s = {seq_len:g} tokens per image (patches + 1)")
    else:
        where = (f"s = {seq_len:g} tokens per block (full attention over the block, causal mask not discounted)"
                 if lm else f"s = {seq_len:g} tokens" + (" (the causal mask is not discounted)" if shape.decoder else ""))
    left_out = ("embeddings, norms, softmax, activation and the LM head" if lm else
                "embeddings, norms, softmax, activation, pooler and head")
    return (f"d = {shape.hidden}, d_h = {shape.head_dim}, {heads}, N = {matrices}, {where}. Counted: the "
            f"{stack_name(shape)} layers only (FLOPs = 2 x MACs); {left_out} are left out (the head is drawn "
            "for reference).")


def headline(macs: float, unit: str) -> str:
    """The cost in the unit the toggle chose (FLOPs = 2 x MACs)."""
    return f"{macs * (2 if unit == 'MFLOPs' else 1) / 1e6:,.1f} {unit}"


SEQ_LENS = [8, 16, 25, 32, 64, 128, 256, 512, 1024, 2048]
START_LENS = [8, 16, 25, 32, 64, 128, 256, 512]      # the slider starts near the sample's mean length


def page() -> None:
    """The whole page: title, the loaded workspace (or why there is none), the controls, the body."""
    st.title("Cost")
    st.caption("What one forward pass of the loaded model costs, block by block, and why pruning only FFN "
               "neurons saves less than the share of neurons removed.")
    ws = ui.require_workspace()
    body(ws, *controls(ws))


def per_unit(ws: Workspace) -> str:
    """What one forward pass's input is called: a block (an LM), an image, a sequence (text)."""
    return "block" if ws.is_lm else "image" if ws.shape.vision else "sequence"


def controls(ws: Workspace) -> tuple[float, str, bool]:
    """Sequence length (tokens; an image model's is fixed: patches + 1), unit, and whether 'Measure
    latency' was pressed."""
    left, mid, right = st.columns([3, 1, 1])
    if ws.shape.vision:
        seq_len = ws.shape.image_tokens
        left.markdown(f"**Tokens per image s = {image_tokens(ws.model.config)}** (patches + 1 class token; "
                      "fixed by the model's image and patch size)")
    else:
        lengths = sorted(set(SEQ_LENS) | ({round(ws.seq_len)} if ws.is_lm else set()))
        start = round(ws.seq_len) if ws.is_lm else min(START_LENS, key=lambda v: abs(v - ws.seq_len))
        label = "Block length s (tokens)" if ws.is_lm else "Sequence length s (tokens)"
        seq_len = left.select_slider(label, lengths, value=start, key="cost_seq_len",
                                     help="Attention's s^2 term grows with length, so the FFN's share shrinks"
                                          + (f" (the workspace's blocks hold {ws.seq_len:g} tokens)" if ws.is_lm else ""))
    unit = mid.radio("Unit", ["MMACs", "MFLOPs"], key="cost_unit", horizontal=True,
                     help="Millions of multiply-accumulates; FLOPs = 2 x MACs")
    measure = right.button("Measure latency", key="cost_measure", disabled=ws.streamed,
                           help="Times every block of this model on this machine (a private copy); not for a "
                                "model opened layer by layer")
    return float(seq_len), unit, measure


def body(ws: Workspace, seq_len: float, unit: str, measure: bool) -> None:
    report = cost_report(ws.shape, seq_len, params=count_params(ws.model))
    st.latex(formula(ws.shape))
    st.caption(formula_note(ws.shape, seq_len, ws.is_lm, ws.model.config))
    share = report.ffn_share
    a, b, c = st.columns(3)
    per = per_unit(ws)
    a.metric(f"{stack_name(ws.shape).capitalize()} cost per {per}", headline(report.encoder_macs, unit),
             help=f"Millions of {'floating-point operations' if unit == 'MFLOPs' else 'multiply-accumulates'} "
                  f"for one {per} of s tokens")
    b.metric("FFN share of the counted MACs", f"{share:.1%}")
    c.metric("Floor of FFN-only pruning", f"{1 - share:.1%} of FLOPs",
             help="What remains with every FFN neuron removed: attention is not pruned")
    st.markdown(f"**Why removing x% of neurons saves less than x% of FLOPs.** Only the FFN is pruned and "
                f"it carries {share:.0%} of the counted MACs at s = {seq_len:g}; removing a fraction x of "
                f"its neurons saves x x {share:.2f} of the FLOPs. Attention (projections and the s^2 "
                f"matrix products) stays, and its share grows with the "
                + ("number of patches (a larger image, or smaller patches)." if ws.shape.vision else f"{per} length."))
    tab_macs, tab_params = st.tabs(["MACs per block", "Parameters per block"])
    with tab_macs:
        frame = charts.cost_frame(report, unit)
        st.plotly_chart(figures.stacked_blocks(frame, "value", f"{unit} per {per}",
                                               f"Cost per layer at s = {seq_len:g} tokens"), key="cost_macs")
    with tab_params:
        st.plotly_chart(figures.stacked_blocks(charts.param_frame(report, ws.shape), "value", "parameters",
                                               "Parameters per layer"), key="cost_params")
    left, right = st.columns([3, 2])
    with left:
        if ws.shape.vision:         # grids of 2 x 2 to 64 x 64 patches, plus the class token
            lengths = [g * g + 1 for g in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)]
        else:
            lengths = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
        st.plotly_chart(figures.share_curve(charts.attention_share_curve(ws.shape, lengths), seq_len, per),
                        key="cost_share")
    with right:
        st.dataframe(charts.savings_table(share) * 100, hide_index=True,
                     column_config={c: st.column_config.NumberColumn(format="%.1f %%")
                                    for c in ("neurons pruned", "FLOPs saved", "relative FLOPs")})
    st.subheader("Measured latency per block")
    if ui.layerwise_note(ws, "timing the blocks"):
        return
    limit = ws.shape.max_positions or round(seq_len)
    length = max(2, min(round(seq_len), limit))
    key = ("latency", ws.model_key, length)
    store = resources.store("results")
    if measure or key in store:
        with st.spinner("Timing every block (5 forward passes)..."), ui.core_errors(runtime=True):
            batch = engine.timing_batch(ws, length)
            frame = store.get_or_compute(key, lambda: block_latency(ws.model, batch))
        rows = len(next(iter(batch.values())))          # input_ids, or an image model's pixel_values
        batch_text = f"{rows} images x {length} tokens" if ws.shape.vision else f"{rows} x {length} tokens"
        st.plotly_chart(figures.stacked_blocks(frame, "ms", "milliseconds per forward pass",
                                               f"Measured time per block, batch {batch_text}"),
                        key="cost_latency")
        st.caption(ui.caption_env(length, rows, "images" if ws.shape.vision else "") + " Other sessions "
                   "running at the same time slow the numbers down."
                   + (f" Timed at {length} tokens, the model's longest input." if length < round(seq_len) else ""))
    else:
        st.caption("Press 'Measure latency' to time every block of this model "
                   + ("on a batch of images." if ws.shape.vision else f"at this {per} length."))

