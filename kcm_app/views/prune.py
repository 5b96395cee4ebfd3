"""Page 5 body: the budget slider with live readouts (a fragment), and the method comparison. For a
causal language model the readouts are perplexity, agreement and KL against the unpruned model, a
generation panel shows both models' continuations of a prompt, and the comparison plots perplexity."""
from __future__ import annotations

import streamlit as st

from kcm_core.evaluate import labels_of
from kcm_core.methods import DEFAULT_LM_METHOD, METHODS

from .. import background, charts, engine, figures, live, resources, state, theme, ui
from ..engine import Workspace


def page() -> None:
    """The whole page: title, the method and rounding, the live readouts, the comparison."""
    st.title("Prune")
    loaded = state.workspace()
    quality = "perplexity" if loaded is not None and loaded.is_lm else "accuracy"
    st.caption(f"Choose how much of the FLOPs to keep and see the pruned model's size, speed and {quality}, "
               "and how the methods compare.")
    ws = ui.require_workspace()
    left, mid, right = st.columns([3, 2, 1])
    method_select(ws, left)
    repair_select(mid)
    multiple_select(right)
    readouts(ws)
    st.divider()
    st.subheader("Compare methods")
    if ws.streamed:
        st.caption("The comparison evaluates every method at every budget, which needs the whole model in "
                   "memory: not available for a model opened layer by layer.")
        return
    compare(ws, *compare_controls(ws))


def method_options(ws: Workspace) -> list[str]:
    """Every method; the label-using ones only when the data has labels (never for a language model,
    whose text has none, nor for a model opened layer by layer, which computes no gradients)."""
    return [m for m, spec in METHODS.items() if not spec.uses_labels or (ws.has_labels and not ws.streamed)]


def method_select(ws: Workspace, container) -> str:
    """The method selector (its value is kept across pages and written to the URL)."""
    options = method_options(ws)
    if state.method() not in options:
        state.set_method(state.DEFAULTS.method)
    return container.selectbox(
        "Method", options, format_func=theme.method_label, **state.persistent_widget(state.W_METHOD),
        help="How neurons are ranked (one colour per method on every chart); label-using methods "
             "appear when the data has labels")


REPAIR_LABELS = {"auto": "The method's own", "none": "None", "bias": "Bias (FLAP)",
                 "scales": "Scales (the paper)", "scales+bias": "Scales + bias", "refit": "Refit the kept rows",
                 "obs": "Re-choose by least squares, then refit"}


def repair_select(container) -> str:
    """How the kept neurons make up for the dropped ones: "which neurons" (the method) and "how the
    rest is repaired" are separate choices, for the readouts and the comparison alike."""
    return container.selectbox(
        "Repair", state.REPAIR_OPTIONS, format_func=REPAIR_LABELS.get,
        **state.persistent_widget(state.W_REPAIR),
        help="After the method picks the neurons, the kept ones are repaired on unlabeled data: one "
             "scale each (the paper), the dropped neurons' mean output as a bias (FLAP), both, or every "
             "kept down-projection row refitted by least squares. Applies to every method compared below.")


def multiple_select(container) -> int:
    return container.selectbox(
        "Round widths to a multiple of", state.MULTIPLES, **state.persistent_widget(state.W_MULTIPLE),
        help="Multiples of 8, 16 or 64 run faster on most hardware; the budget still holds")


def compare_controls(ws: Workspace) -> tuple[list[str], list[float], bool]:
    """Methods, budgets (those above this model's floor, ascending), and whether 'Compare' was pressed."""
    left, mid, right = st.columns([3, 2, 1])
    options = method_options(ws)
    methods = left.multiselect("Methods", options, default=default_methods(options, ws.is_lm, ws.shape.vision),
                               format_func=theme.method_label, key="compare_methods", help="One line per method")
    budgets = mid.multiselect("Relative FLOPs", charts.BUDGET_OPTIONS,
                              default=charts.budget_grid(ws.floor, points=3), key="compare_budgets",
                              help="Budgets to evaluate (each one: select, scale, slice, evaluate)")
    run = right.button("Compare", key="compare_run", help="Evaluates the pairs not stored yet, with progress")
    # the slider's budget is always one of the points, so the comparison shows where the readouts are
    return methods, sorted({b for b in budgets if b >= ws.floor} | {round(state.budget(), 2)}), run


def default_methods(options: list[str], lm: bool = False, vision: bool = False) -> list[str]:
    """The comparison's default lines: KCM against weight magnitude, random, and (with labels)
    Mask-Tuning; for a language model its default (fluctuation + refit, curve allocation) against the
    paper's KCM and the LLM baselines Wanda-sp and FLAP; for an image model its default (fluctuation +
    refit) against the paper's KCM, FLAP and random. The other methods can be added."""
    wanted = ((DEFAULT_LM_METHOD, "kcm", "wanda-sp", "flap") if lm
              else ("fluct-refit", "kcm", "flap", "random") if vision
              else ("kcm", "weight-magnitude", "random", "mask-tuning"))
    return [m for m in wanted if m in options]


def _pct(x: float) -> str:
    return f"{x:.1%}"


@st.fragment
def readouts(ws: Workspace) -> None:
    """Moving the slider reruns only this function, not the page. Top to bottom: the slider, the
    instant readouts (with the measured speedup once timed), the evaluated ones and the progress of
    whatever is still computing, then what they rest on (an expander), the kept neurons per layer and,
    for a language model, the generation panel: a presenter sees the slider and every readout together
    (1440 x 1000, tested in a real browser)."""
    low = state.clamp_budget(0.0, ws.floor)
    state.set_budget(state.clamp_budget(state.budget(), ws.floor))
    budget = st.slider("Relative FLOPs to keep", min_value=low, max_value=1.0, step=0.01, format="%.2f",
                       **state.persistent_widget(state.W_BUDGET),
                       help=f"Fraction of the unpruned {'decoder' if ws.is_lm else 'encoder'} layers' FLOPs the "
                            f"pruned model may use, counted at "
                            + (f"the block length s = {ws.seq_len:g} tokens" if ws.is_lm else
                               f"s = {ws.seq_len:g} tokens per image (patches + 1)" if ws.shape.vision else
                               f"the sample's mean length s = {ws.seq_len:g} tokens") + ". Only FFN neurons are "
                            f"pruned, so the floor is {ws.floor:.1%}.")
    config = ui.prune_config(budget=float(budget))
    prompt = state.prompt(engine.DEFAULT_PROMPT) if ws.is_lm else ""
    store = resources.store("results")
    # Start this budget's slow work before anything else the run draws: a run cut short after this
    # point (a newer rerun request) still leaves the newest budget evaluating.
    job = None if ws.streamed else start_view(ws, config, store, prompt)
    ui.sync_url()
    with ui.progress(f"Scoring with {METHODS[config.method].label}") as bar, ui.core_errors():
        ui.follow_background(ws, (background.SCORES,), bar)
        scores = engine.method_scores(ws, config, store, bar)
    with ui.core_errors():
        fast = engine.readout(ws, scores, config, store)
    st.caption(f"= {fast.neurons_pruned:.1%} of FFN neurons pruned ({fast.neurons_kept:,} of "
               f"{fast.neurons_total:,} kept).")
    cols = st.columns(4 if ws.streamed else 5)
    cols[0].metric("Relative FLOPs", _pct(fast.relative_flops),
                   help=f"{'Decoder' if ws.is_lm else 'Encoder'} layers' MACs after / before, at s")
    cols[1].metric("Parameters", f"{fast.params_after:,}", f"{fast.relative_params - 1:+.1%}",
                   delta_color="inverse", help="Exact count of the sliced model; the change is in percent of "
                                               "the unpruned model's parameters")
    cols[2].metric("Neurons pruned", _pct(fast.neurons_pruned))
    cols[3].metric("Estimated speedup", f"{fast.estimated_speedup:.2f}x",
                   help="Unpruned over pruned MACs: 1 / relative FLOPs, plus for a language model its "
                        "unpruned head (hidden x vocabulary per token) on both sides")
    if ws.streamed:
        kept_chart(fast, config)
        ui.layerwise_note(ws, "the pruned model's " + ("perplexity" if ws.is_lm else "accuracy") +
                          ", its measured speed and the method comparison (the export scales the kept "
                          "neurons and writes the pruned model layer by layer)")
        return
    if job is not None and not job.done:
        job.wait(live.FIRST_WAIT_S)      # a quick view (the tiny test model) is drawn whole, without flicker
    parts = view_parts(ws, config, store, prompt)
    speed_metric(ws, config, store, cols[4], parts)
    slow = None
    if parts[0]:
        slow = engine.evaluate_budget(ws, config, store)      # stored: read, not computed
        state.set_shown(slow)
        st.caption(f"Readouts at {slow.budget:.2f} relative FLOPs.")
        quality_readouts(ws, store, slow)
    if not all(parts):
        view_status(ws, config, store, prompt, job, parts)
    if slow is not None:
        with st.expander("How these readouts were measured"):
            if ws.is_lm:
                st.caption(perplexity_note(ws, store, slow))
            st.caption(readout_note(ws, slow, engine.measure_speed(ws, config, store) if parts[1] else None))
    kept_chart(fast, config)
    if ws.is_lm:
        generation_panel(ws, config, store, prompt, parts, job)
    elif slow is not None and ws.shape.vision and slow.predictions is not None:
        from .images import prediction_grid
        prediction_grid(ws, engine.reference(ws, store).predictions, slow.predictions, slow.budget)


def kept_chart(fast: engine.Readout, config) -> None:
    st.plotly_chart(figures.kept_per_layer(charts.kept_frame(fast.plan), config.method), key="prune_kept")


# What a budget's slow work computes, in order: each part is stored on its own, and the page draws
# whichever are stored while the job computes the rest (a language model adds the generation panel).
STAGES = ("evaluation", "timing", "generation")


def view_key(ws: Workspace, config, prompt: str) -> tuple:
    """The job key of one view: the budget's configuration, and for a language model the prompt."""
    return ("view",) + engine.budget_key(ws, config) + ((prompt,) if ws.is_lm else ())


def view_parts(ws: Workspace, config, store, prompt: str) -> tuple[bool, ...]:
    """Which of ``STAGES`` are stored for this view (the evaluation, the timing, the continuations)."""
    parts = (engine.is_evaluated(ws, config, store), engine.is_timed(ws, config, store))
    return parts + ((engine.is_generated(ws, config, prompt, store),) if ws.is_lm else ())


def view_job(ws: Workspace, config, store, prompt: str):
    """The job that computes what this view lacks, one stage after the other, each stored as soon as it
    is done. Every stage reports its steps (evaluation batches, timed passes, generated tokens), where an
    abandoned job stops; an abandoned stage stores nothing (``SharedStore.get_or_compute``)."""
    stages = [("evaluation", lambda p: engine.evaluate_budget(ws, config, store, p)),
              ("timing", lambda p: engine.measure_speed(ws, config, store, p))]
    if ws.is_lm:
        stages.append(("generation", lambda p: engine.continuations(ws, config, prompt, store, progress=p)))

    def run(progress) -> None:
        for i, (name, compute) in enumerate(stages):
            compute(live.stage(progress, name, i, len(stages)))
    return run


def start_view(ws: Workspace, config, store, prompt: str) -> live.Job | None:
    """This view's job on the session's latest-only runner (the running one when it is the newest
    request), or None when it needs none: everything is stored (then the running job, for another
    budget, is abandoned: nobody will look at it), or the user stopped it."""
    key = view_key(ws, config, prompt)
    runner = state.evaluator()
    if all(view_parts(ws, config, store, prompt)) or state.stopped() == key:
        runner.keep_only(key)
        return None
    return runner.submit(key, view_job(ws, config, store, prompt))


def view_status(ws: Workspace, config, store, prompt: str, job: live.Job | None, parts: tuple[bool, ...]) -> None:
    """Where this view's job is: its progress (with a Stop button) while it runs, or why it is not
    running (stopped by the user, or failed: an evaluation that failed stops the page)."""
    stage = STAGES[parts.index(False)]
    if job is None:
        st.info(f"The {stage} of {config.budget:.2f} relative FLOPs was stopped. Move the slider, or "
                "evaluate this budget after all.")
        if st.button("Evaluate this budget", key="resume_eval"):
            state.set_stopped(None)
            ui.rerun_page()
        return
    if job.done:
        if isinstance(job.error, live.Abandoned):
            return                       # superseded; the next run draws the newer view
        with ui.core_errors(stop=stage == "evaluation", runtime=stage == "generation"):
            job.outcome()
        return
    st.fragment(pending_view, run_every=live.POLL_S)(ws, config, store, prompt, job, parts)


def pending_view(ws: Workspace, config, store, prompt: str, job: live.Job, drawn: tuple[bool, ...]) -> None:
    """While ``job`` computes this view: its progress and, until this budget is evaluated, the last
    budget's readouts, labelled as such. Reruns every ``live.POLL_S``; once the job stored another part
    (or ended), the whole page reruns, which stops this timer and draws what is new."""
    if job.done or view_parts(ws, config, store, prompt) != drawn:
        ui.rerun_page()
    st.progress(min(max(job.fraction, 0.0), 1.0), text=f"{config.budget:.2f} relative FLOPs, {job.message}")
    if st.button("Stop", key="stop_eval", help="Stop this budget's evaluation, timing or generation at its next "
                                                "step (a big model's scoring or scaling can take minutes); the "
                                                "slider stays where it is"):
        job.cancel()
        state.set_stopped(job.key)
        ui.rerun_page()
    if drawn[0]:
        return
    shown = state.shown()
    if shown is not None and shown.method == config.method:
        st.caption(f"Showing the readouts at {shown.budget:.2f} relative FLOPs until {config.budget:.2f} "
                   "is evaluated.")
        quality_readouts(ws, store, shown, stale=True)
    else:
        st.caption(("Perplexity" if ws.is_lm else "Accuracy") + " appears here once this budget is evaluated.")


def speed_metric(ws: Workspace, config, store, container, parts: tuple[bool, ...]) -> None:
    """The measured speedup beside the estimated one, once the timing is stored (the job times the
    sliced model after its evaluation); a dash until then."""
    help_text = "Wall time of the unpruned / the sliced model on this machine, measured after the evaluation"
    if parts[1]:
        speed = engine.measure_speed(ws, config, store)           # stored: read, not computed
        container.metric("Measured speedup", f"{speed.measured_speedup:.2f}x", help=f"{help_text}: {speed.timed_on}")
    else:
        container.metric("Measured speedup", "\u2014", help=help_text)


def quality_readouts(ws: Workspace, store, slow: engine.BudgetResult, stale: bool = False) -> None:
    """The evaluated readouts of ``slow`` in one row: a classifier's accuracy and agreement, a language
    model's perplexity, agreement and KL (a stale one, while a newer budget runs, names its budget)."""
    at = f" at {slow.budget:.2f}" if stale else ""
    if ws.is_lm:
        lm_readouts(ws, slow, store, at)
        return
    cols = st.columns(3)
    if slow.accuracy is not None:
        dense = engine.reference(ws, store).accuracy
        change = (slow.accuracy.value - dense.value) * 100
        cols[0].metric("Accuracy" + at, _pct(slow.accuracy.value), f"{change:+.1f} pp",
                       help=f"Change in percentage points vs the unpruned model ({dense.value:.1%})")
        cols[1].metric("Agreement with unpruned" + at, _pct(slow.agreement.value),
                       help="Share of test examples where the pruned model predicts what the unpruned one does")
    elif slow.agreement is not None:
        cols[0].metric("Agreement with unpruned" + at, _pct(slow.agreement.value),
                       help="Share of held-out examples where the pruned model predicts what the unpruned one "
                            "does (needs no labels)")
        cols[1].info("No labels: accuracy unavailable.")
    else:
        cols[0].info("No labels: accuracy unavailable.")


def lm_readouts(ws: Workspace, slow: engine.BudgetResult, store, at: str = "") -> None:
    """Perplexity (with the change), agreement and KL against the unpruned model, and a warning when the
    pruned model has collapsed."""
    dense = engine.reference_lm(ws, store).perplexity
    ppl, agr, kl = slow.perplexity, slow.agreement, slow.kl
    cols = st.columns(3)
    collapsed = ppl.value > charts.COLLAPSED_RATIO * dense.value
    cols[0].metric("Perplexity" + at, "collapsed" if collapsed else f"{ppl.value:,.2f}",
                   None if collapsed else f"{ppl.value / dense.value - 1:+.1%}", delta_color="inverse",
                   help=f"Held-out perplexity of the sliced model, 95% interval {ppl.low:,.2f} to {ppl.high:,.2f} "
                        f"over {ppl.n} blocks; unpruned {dense.value:,.2f}")
    cols[1].metric("Agreement with unpruned" + at, _pct(agr.value),
                   help="Share of next-token positions where the pruned model's top-1 prediction is the "
                        "unpruned model's")
    cols[2].metric("KL from unpruned" + at, f"{kl.value:.3f} nats",
                   help="Mean KL(unpruned || pruned) of the next-token distributions, per token")
    if collapsed and not at:
        st.warning(f"The pruned model has collapsed: its perplexity is {ppl.value / dense.value:,.0f} times the "
                   "unpruned model's, so its text is noise. Keep more FLOPs, or try another method or repair "
                   "(the comparison below shows where each one breaks).")


def perplexity_note(ws: Workspace, store, slow: engine.BudgetResult) -> str:
    """The perplexity readout's interval, the unpruned one's, the blocks, and the paired ratio."""
    dense = engine.reference_lm(ws, store).perplexity
    ppl = slow.perplexity
    return (f"Perplexity {ppl.value:,.2f} (95% interval {ppl.low:,.2f} to {ppl.high:,.2f}) against "
            f"{dense.value:,.2f} unpruned ({dense.low:,.2f} to {dense.high:,.2f}) on {ws.info.eval_source}; "
            + (f"paired ratio x{slow.paired.ratio:.2f} [{slow.paired.low:.2f}, {slow.paired.high:.2f}]."
               if slow.paired else ""))


def generation_panel(ws: Workspace, config, store, prompt: str, parts: tuple[bool, ...],
                     job: live.Job | None) -> None:
    """The same prompt continued greedily by the unpruned and the pruned model, side by side (made by
    this view's job after the timing; until then the prompt can already be changed)."""
    st.subheader("Generation")
    st.text_input("Prompt", **state.persistent_widget(state.W_PROMPT),
                  help=f"Both models continue it greedily with {engine.GENERATION_TOKENS} new tokens")
    if not parts[2]:
        if job is None or not job.done:
            st.caption("The continuations appear here once this budget is evaluated and timed (progress above).")
        return
    out = engine.continuations(ws, config, prompt, store)         # stored: read, not computed
    from kcm_core.lm import generation_note
    cut = generation_note(ws.model, ws.tokenizer, prompt, out.new_tokens)
    if cut:                              # past the model's positions: the last prompt tokens that fit
        st.info(cut)
    left, right = st.columns(2)
    with left.container(border=True):
        st.markdown("**Unpruned**")
        st.text(out.prompt + out.dense)
        st.metric("Tokens per second (unpruned)", f"{out.dense_tokens_per_s:,.1f}")
    with right.container(border=True):
        st.markdown(f"**Pruned** ({theme.method_label(config.method)}, {config.budget:.2f} relative FLOPs)")
        st.text(out.prompt + out.pruned)
        st.metric("Tokens per second (pruned)", f"{out.pruned_tokens_per_s:,.1f}",
                  f"{out.pruned_tokens_per_s / out.dense_tokens_per_s - 1:+.0%}" if out.dense_tokens_per_s else None,
                  help="Change vs the unpruned model's rate")
    st.caption(f"Greedy decoding, up to {out.new_tokens} new tokens, the same prompt for both models. Tokens "
               "per second: new tokens over the wall time of one generation, both timed one after the other "
               f"on this machine ({ui.threads_note()} Other sessions computing at the same time disturb it).")


def readout_note(ws: Workspace, slow: engine.BudgetResult, speed: engine.SpeedResult | None) -> str:
    """What the slow readouts were measured on (the speed once it is timed)."""
    parts = []
    if slow.accuracy is not None:
        parts.append(f"Accuracy of the physically sliced model on {ws.info.eval_examples} examples "
                     f"(95% interval {slow.accuracy.low:.1%} to {slow.accuracy.high:.1%}).")
    elif slow.agreement is not None:
        parts.append(f"Agreement of the physically sliced model with the unpruned one on "
                     f"{ws.info.eval_examples} held-out {'blocks' if ws.is_lm else 'examples'} "
                     f"(95% interval {slow.agreement.low:.1%} to {slow.agreement.high:.1%}).")
    info = slow.plan.info
    unit = "calibration blocks" if ws.is_lm else "unlabeled images" if ws.shape.vision else "unlabeled sequences"
    fitted = min(engine.scale_samples(ws), ws.info.sample or engine.scale_samples(ws))   # thin data: what there is
    if info.repair in (None, "none"):
        parts.append("No repair: the kept neurons are used as they were.")
    elif info.repair == "bias" and info.repair_target == "teacher":
        parts.append("Repair: the dropped neurons' mean output (on the calibration data) added as a bias.")
    else:
        what = {"scales": "one scale per kept neuron", "bias": "a bias", "scales+bias": "scales and a bias",
                "refit": "every kept down-projection row refitted",
                "obs": ("each layer's neurons re-chosen (same count) by the least-squares error their removal "
                        "leaves, then every kept row refitted")}[info.repair]
        aim = ("the unpruned model's output" if info.repair_target == "teacher"
               else "the unpruned layer's output on the pruned model's own inputs")
        failed = (f" ({info.scaled_layers} of {len(slow.plan.layers)} layers scaled)" if info.scaled_layers is not None
                  else f" (the solve failed in layers {info.repair_failed_layers}: left as selected)"
                  if info.repair_failed_layers else "")
        where = (f"all {ws.info.sample} {unit}" if info.repair in ("refit", "obs")
                 else f"the first {fitted} {unit} to keep a new budget quick")
        parts.append(f"Repair: {what}, fitted to {aim} on {where}{failed}.")
    if speed is not None:
        parts.append(f"Speed: {speed.dense_seconds * 1e3:.1f} ms unpruned vs {speed.pruned_seconds * 1e3:.1f} ms "
                     f"sliced, {speed.timed_on}; {ui.threads_note()} Other sessions computing at the same time "
                     "disturb it.")
    return " ".join(parts)


@st.fragment
def compare(ws: Workspace, methods: list[str], budgets: list[float], run: bool) -> None:
    """Accuracy (an LM: perplexity) vs relative FLOPs for several methods; computed on request,
    stored for everyone."""
    if not (ws.has_labels or ws.is_lm):
        st.info("The comparison needs labeled evaluation data (name a label column in the sidebar).")
        return
    store = resources.store("results")
    base = ui.prune_config()
    configs = engine.comparison_configs(methods, budgets, base)
    done = all(engine.is_evaluated(ws, config, store) for config in configs)
    if not (run or done):
        st.caption(f"{len(configs)} evaluations (each method at each budget, random with "
                   f"{engine.RANDOM_SEEDS} seeds); press 'Compare' to run those not stored yet.")
        return
    if not done:
        # one computation at a time on shared cores: the slider's job (its budget is one of the points
        # here) is abandoned, and the readouts start it again for what is still missing afterwards
        state.evaluator().keep_only()
    with ui.progress("Comparing methods") as bar, ui.core_errors():
        results = engine.comparison(ws, methods, budgets, base, store, bar)
    left, right = st.columns(2)
    if ws.is_lm:
        frame = charts.comparison_frame(results, metric="perplexity")
        dense = engine.reference_lm(ws, store).perplexity.value
        left.plotly_chart(figures.comparison_lm(frame, dense, state.budget()), key="prune_compare")
    else:
        frame = charts.comparison_frame(results)
        dense = engine.reference(ws, store).accuracy.value
        left.plotly_chart(figures.comparison(frame, dense, state.budget()), key="prune_compare")
    left.caption("Bars are each method's own 95% interval. Random is drawn with "
                 f"{engine.RANDOM_SEEDS} seeds (the sidebar's and the next ones): its line is their mean and "
                 "its bars span all of their 95% intervals.")
    with right:
        paired_view(ws, methods, results)


def paired_view(ws: Workspace, methods: list[str], results: list[engine.BudgetResult]) -> None:
    """Each method minus a reference method (the model's default method by default) on the same
    examples (a language model: held-out blocks), at each budget."""
    if len(methods) < 2:
        st.caption("Choose two or more methods to see their paired differences.")
        return
    default = ws.default_method
    reference = st.selectbox("Reference method", methods, index=methods.index(default) if default in methods else 0,
                             format_func=theme.method_label, key="compare_reference",
                             help="Every other method is compared with this one on the same "
                                  + ("held-out blocks" if ws.is_lm else "examples"))
    labels = None if ws.is_lm else labels_of(ws.eval_batches)
    with ui.core_errors():
        frame = charts.paired_frame(results, reference, labels, seed=state.seed())
    if frame.empty:
        st.caption("No other method was evaluated at the reference method's budgets.")
        return
    st.plotly_chart(figures.paired_differences(frame, reference, lm=ws.is_lm), key="prune_paired")
    name = theme.method_label(reference)
    if ws.is_lm:
        st.caption(f"Perplexity of each method over {name}'s, minus 1, on the same held-out blocks; the 95% "
                   "interval resamples blocks once for both (paired). An interval that excludes 0 is a "
                   "difference. Random: its first seed.")
        return
    st.caption(f"Accuracy of each method minus {name}'s on the same {ws.info.eval_examples} test examples, "
               "in percentage points. The 95% interval resamples examples with each example's pair of "
               "outcomes kept together (paired bootstrap); McNemar's exact p counts the examples only one "
               "of the two gets right. An interval that excludes 0 (p < 0.05) is a difference. Random: its "
               "first seed.")
    table = frame.assign(method=frame["method"].map(theme.method_label))[
        ["method", "budget", "difference", "low", "high", "p_value", "only_method", "only_reference"]]
    st.dataframe(table, hide_index=True, column_config={
        "method": "Method", "budget": st.column_config.NumberColumn("Budget", format="%.2f"),
        "difference": st.column_config.NumberColumn("Difference (pp)", format="%+.1f"),
        "low": st.column_config.NumberColumn("95% low (pp)", format="%+.1f"),
        "high": st.column_config.NumberColumn("95% high (pp)", format="%+.1f"),
        "p_value": st.column_config.NumberColumn("McNemar p", format="%.3f"),
        "only_method": st.column_config.NumberColumn("Only the method right"),
        "only_reference": st.column_config.NumberColumn(f"Only {name} right")})
