"""README numbers come from the results files (``benchmarks/render_readme.py``), and the speed
verdicts from intervals over paired rounds (``benchmarks/common.py``): known answers and a drift check."""
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers

from kcm_core.report import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import render_readme  # noqa: E402


@pytest.mark.parametrize("name", ["README.md", "benchmarks/README.md"])
def test_readme_numbers_match_the_results_files(name):
    """Fails when a results file changed and a README was not regenerated (or was edited by hand):
    run ``python benchmarks/render_readme.py``."""
    text = (ROOT / name).read_text()
    marked = [m["name"] for m in render_readme.MARKER.finditer(text)]
    assert sorted(marked) == sorted(render_readme.PLACES[name])      # its blocks, each once
    assert render_readme.render(text) == text


def test_every_block_has_one_place():
    placed = [name for names in render_readme.PLACES.values() for name in names]
    assert sorted(placed) == sorted(render_readme.BLOCKS)


def test_no_markdown_link_leaves_the_repository():
    """Links in the READMEs and docs/ point at files of this repository (or the web), never at a
    path outside it such as ../shared/."""
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(files) > 3
    outside, missing = [], []
    for path in files:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            resolved = (path.parent / target).resolve()
            if ROOT.resolve() not in resolved.parents and resolved != ROOT.resolve():
                outside.append(f"{path.name}: {target}")
            elif not resolved.exists():
                missing.append(f"{path.name}: {target}")
        outside += [f"{path.name}: {m}" for m in re.findall(r"\.\./shared/\S*", text)]
    assert outside == [] and missing == []


def test_render_replaces_only_the_marked_block(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    render_readme.BLOCKS["toy"] = lambda folder: f"numbers from {folder.name}\n"
    try:
        text = "intro 1.41x\n<!-- results:toy -->\nstale 9.99x\n<!-- /results:toy -->\noutro 2.0x\n"
        assert render_readme.render(text, results) == (
            "intro 1.41x\n<!-- results:toy -->\nnumbers from results\n<!-- /results:toy -->\noutro 2.0x\n")
    finally:
        del render_readme.BLOCKS["toy"]


def test_render_refuses_unknown_and_unclosed_blocks():
    with pytest.raises(ValueError, match=r"\['nope'\].*does not know"):
        render_readme.render("<!-- results:nope -->\nx\n<!-- /results:nope -->\n")
    with pytest.raises(ValueError, match="without a matching"):
        render_readme.render("<!-- results:speed -->\nx\n")


def test_check_mode_reports_drift_and_changes_nothing(tmp_path, capsys):
    readme = tmp_path / "README.md"
    stale = "<!-- results:lm_speed -->\nold numbers\n<!-- /results:lm_speed -->\n"
    readme.write_text(stale)
    assert render_readme.main(["--check", "--readme", str(readme)]) == 1
    assert "-old numbers" in capsys.readouterr().out and readme.read_text() == stale
    assert render_readme.main(["--readme", str(readme)]) == 0
    assert render_readme.main(["--check", "--readme", str(readme)]) == 0
    assert "old numbers" not in readme.read_text()


def test_ratio_interval_is_the_median_per_round_ratio_with_a_seeded_interval():
    dense = [10.0, 12.0, 11.0, 30.0, 10.5]
    pruned = [5.0, 6.0, 5.5, 10.0, 7.0]                  # ratios 2, 2, 2, 3, 1.5
    out = common.ratio_interval(dense, pruned, seed=3)
    assert out["median"] == 2.0 and out["rounds"] == 5
    low, high = out["ci95"]
    assert 1.5 <= low <= 2.0 <= high <= 3.0
    assert common.ratio_interval(dense, pruned, seed=3) == out
    # the same ratio in every round: no spread at all
    assert common.ratio_interval([4.0, 6.0, 8.0], [2.0, 3.0, 4.0])["ci95"] == [2.0, 2.0]
    assert common.ratio_interval([3.0], [2.0]) == {"median": 1.5, "ci95": [1.5, 1.5], "rounds": 1}
    with pytest.raises(ValueError, match="same number of paired rounds"):
        common.ratio_interval([1.0, 2.0], [1.0])


def test_a_goal_is_met_only_when_the_lower_end_clears_it():
    assert common.goal_verdict({"ci95": [1.41, 1.9]}, 1.4) == "met"
    assert common.goal_verdict({"ci95": [1.2, 1.9]}, 1.4) == "not shown"     # median may be above
    assert common.goal_verdict({"ci95": [1.1, 1.3]}, 1.4) == "not met"


def test_idle_only_when_the_load_before_says_so():
    assert common.machine_state({"load_average_before": [0.2, 0.1, 0.1],
                                 "load_average_after": [2.0, 1, 1]}).startswith("idle (load 0.2 before")
    assert common.machine_state({"load_average_before": [1.6, 1, 1],
                                 "load_average_after": [1.7, 1, 1]}).startswith("shared (load 1.6 before, 1.7 after")
    assert common.machine_state({}) == "unknown (no load recorded)"


def test_a_run_that_ends_busier_than_its_own_threads_was_shared():
    quiet_before = {"load_average_before": [0.1, 0.1, 0.1], "threads": 2}
    assert common.machine_state({**quiet_before, "load_average_after": [2.3, 1, 1]}).startswith("idle")
    assert common.machine_state({**quiet_before, "load_average_after": [3.0, 1, 1]}).startswith(
        "shared (load 0.1 before, 3.0 after")


def test_run_environment_records_machine_versions_load_and_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_speed.py", "--quick"])
    monkeypatch.setattr(common.os, "getloadavg", lambda: (1.0, 0.8, 0.6))
    env = common.run_environment([0.1, 0.2, 0.3], onnxruntime="9.9")
    assert env["command"].endswith("python benchmarks/bench_speed.py --quick")
    assert env["load_average_before"] == [0.1, 0.2, 0.3] and len(env["load_average_after"]) == 3
    assert env["onnxruntime"] == "9.9" and env["machine_state"].startswith("idle")
    assert env["cpu"] == cpu_name() and env["threads"] == torch.get_num_threads()
    assert (env["torch"], env["transformers"]) == (torch.__version__, transformers.__version__)


class FakeClock:
    """perf_counter and process_time for timed runners: each runner advances it by its own cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, costs: list[float]):
        calls = iter(costs)

        def run() -> None:
            self.now += next(calls)
        return run


def test_bench_speed_keeps_every_round_and_pairs_the_ratios(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # undone after
    import bench_speed
    clock = FakeClock()
    monkeypatch.setattr(bench_speed.time, "perf_counter", clock)
    monkeypatch.setattr(bench_speed.time, "process_time", clock)
    # one warm-up each, then 5 rounds; the machine slows down in round 3 for both models alike
    dense = clock.runner([9.0, 2.0, 2.0, 6.0, 2.0, 2.0])
    pruned = clock.runner([9.0, 1.0, 1.0, 3.0, 1.0, 1.5])
    timing = bench_speed.time_round_robin({"dense": dense, "kcm@0.6": pruned}, warmup=1, repeats=5)
    assert timing["dense"]["rounds_ms"] == [2000.0, 2000.0, 6000.0, 2000.0, 2000.0]
    assert timing["kcm@0.6"]["rounds_ms"] == [1000.0, 1000.0, 3000.0, 1000.0, 1500.0]
    row = {"budget": 0.6, "batch": 32, "multiple": 1, "seq": 64,
           **bench_speed.speedups(timing["dense"], timing["kcm@0.6"])}
    assert row["speedup"] == 2.0                # median of 2, 2, 2, 2, 1.33: the slow round 3 cancels out
    assert 4 / 3 <= row["speedup_ci95"][0] and row["speedup_ci95"][1] == 2.0
    line = bench_speed.goal_line({"pytorch": [row]})
    assert "seq 64: 2.00x [" in line and ("**met**" in line) == (row["speedup_ci95"][0] >= 1.4)
    old = {key: row[key] for key in ("budget", "batch", "multiple", "seq", "speedup")}
    assert "**not shown** (this file has no per-round times" in bench_speed.goal_line({"pytorch": [old]})


def _quality_row(name: str, hits: str, budget: float = 0.6) -> dict:
    """A quality-benchmark row with only what ``summarise`` reads (one seed)."""
    return {"method": name, "seed": 0, "budget": budget, "hits": hits, "agree": hits,
            "accuracy": {"value": hits.count("1") / len(hits)}, "agreement": {"value": 1.0},
            "relative_flops": budget, "seq_len": 20.0, "seconds": {"scoring": 1.0, "pruning": 1.0}}


def test_quality_summary_pairs_every_pruned_model_with_the_unpruned_one_and_with_kcm(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))   # undone after
    import bench_quality
    dense = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])       # 8 of 10 right
    kcm = "1111110010"          # 7: misses texts 6 and 7 that the unpruned model gets, gets text 8
    magnitude = "1100000011"    # 4: gets texts 8 and 9 only it gets, misses 2 to 7
    summary = {r["method"]: r for r in bench_quality.summarise(
        [_quality_row("kcm", kcm), _quality_row("weight-magnitude", magnitude)], dense)}
    to_dense = summary["kcm"]["vs_unpruned"]["per_seed"][0]
    assert to_dense["value"] == pytest.approx(-0.1) and (to_dense["a_only"], to_dense["b_only"]) == (1, 2)
    assert to_dense["mcnemar_p"] == pytest.approx(1.0)                        # 1 of 3 discordant
    assert summary["kcm"]["unpruned_vs_kcm"]["difference_mean"] == pytest.approx(0.1)   # the same, reversed
    to_dense = summary["weight-magnitude"]["vs_unpruned"]
    assert to_dense["difference_mean"] == pytest.approx(-0.4)
    assert to_dense["mcnemar_p"] == [pytest.approx(74 / 256)]                 # 2 of 8 discordant, two-sided
    low, high = to_dense["ci95_seed_averaged"]
    assert low <= -0.4 <= high          # ten texts: wide, and it holds the observed difference
    assert summary["weight-magnitude"]["vs_kcm"]["difference_mean"] == pytest.approx(-0.3)


def test_mpnet_results_list_what_was_not_measured(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))   # undone after
    import bench_mpnet
    data = {"requested": {"methods": ["kcm", "d2"], "budgets": [0.6, 0.5], "seeds": [0, 1]},
            "rows": [{"method": m, "budget": b, "seed": 0} for m in ("kcm", "d2") for b in (0.6, 0.5)]
            + [{"method": "kcm", "budget": 0.6, "seed": 1}],
            "kcm_run": {"stage_seconds": {}}, "speed": None}
    assert bench_mpnet.missing(data) == ["kcm at 0.5 (seed 1)", "d2 at 0.6 (seed 1)", "d2 at 0.5 (seed 1)",
                                         "sliced speedup"]
    data["rows"] += [{"method": "kcm", "budget": 0.5, "seed": 1}] + [{"method": "d2", "budget": b, "seed": 1}
                                                                    for b in (0.6, 0.5)]
    data["speed"] = {"rounds": 10}
    assert bench_mpnet.missing(data) == []


def test_mpnet_merge_keeps_earlier_seeds_only_from_the_same_fine_tuned_model(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))   # undone after
    import bench_mpnet
    monkeypatch.setattr(bench_mpnet, "RESULTS", tmp_path)
    settings = {"samples": 512, "labeled": 256, "scale_samples": 256, "test": 4, "threads": 2}
    earlier = {"settings": {**settings, "threads": 1, "seed": 0}, "unpruned": {"hits": "1101"},
               "model": {"finetune": {"final_loss": 0.5}}, "command": "bench_mpnet.py", "environment": {},
               "rows": [{"method": "kcm", "budget": 0.6, "seed": 0}], "kcm_run": {"seed": 0}, "speed": None}
    (tmp_path / "mpnet.json").write_text(json.dumps(earlier))
    now = {"settings": settings, "unpruned": {"hits": "1101"}, "model": {"finetune": {"final_loss": 0.5}}}
    kept = bench_mpnet.earlier_file(now)
    assert kept["rows"] == [{"method": "kcm", "budget": 0.6, "seed": 0, "reused": []}]   # threads may differ
    assert bench_mpnet.earlier_file({**now, "unpruned": {"hits": "1100"}}) is None        # another model
    assert bench_mpnet.earlier_file({**now, "model": {"finetune": {"final_loss": 0.6}}}) is None
    assert bench_mpnet.earlier_file({**now, "settings": {**settings, "labeled": 512}}) is None


def test_readme_paired_cell_is_points_with_the_paired_interval_and_mcnemar_p():
    paired = {"difference_mean": -0.0124, "ci95_seed_averaged": [-0.03, 0.005], "mcnemar_p": [0.0421]}
    assert render_readme._paired(paired) == "-1.2 [-3.0, +0.5], p 0.042"
    assert render_readme._paired({**paired, "mcnemar_p": [3e-6]}).endswith("p 3e-06")
    assert render_readme._paired(None) == ""


def test_image_default_goal_counts_only_plain_methods_at_and_below_0_7(tmp_path, monkeypatch):
    """``classifier_default.py --family image``: a candidate is ahead of a row only where the paired
    interval clears 0, repair cells of one score do not count against the goal, and 0.9 is not checked."""
    import classifier_default as cd
    n = 200
    base = "1" * 150 + "0" * 50
    rows = [{"method": "fluct-refit", "seed": 0, "budget": b, "hits": "1" * 190 + "0" * 10, "agree": base}
            for b in (0.9, 0.7)]
    rows += [{"method": m, "seed": 0, "budget": b, "hits": h, "agree": base}
             for b in (0.9, 0.7)
             for m, h in (("kcm", base), ("flap", "1" * 189 + "0" * 11), ("kcm/pooled/refit/local", base))]
    assert all(len(r["hits"]) == n for r in rows)
    (tmp_path / "vision.json").write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(cd, "RESULTS", tmp_path)
    data = cd.analyse(["fluct-refit"], {"vision demo": "vision.json"})
    per = data["tasks"]["vision demo"]["candidates"]["fluct-refit"]
    assert cd.verdict(per["0.7"]["kcm"]) == "ahead" and cd.verdict(per["0.7"]["flap"]) == "not shown different"
    goal = cd.image_goal(data)["fluct-refit"][0]
    assert goal["not_ahead"] == ["0.7 vs flap (not shown different)"]       # not the cell, not 0.9


def test_an_anchor_above_the_unpruned_model_is_named_in_the_text_goal(tmp_path, monkeypatch):
    """``classifier_default.py``: each method's accuracy minus the unpruned model's, paired on the same
    texts (a known answer), and a goal-1 miss against an anchor that is itself above the unpruned model
    says so."""
    import classifier_default as cd
    unpruned = "1" * 100 + "0" * 100                       # 50%
    lucky = "1" * 160 + "0" * 40                           # random, 80%: +30 points on the same texts
    faithful = unpruned                                    # the candidate copies the unpruned model
    rows = [{"method": "random", "seed": 0, "budget": 0.9, "hits": lucky, "agree": "1" * 200},
            {"method": "kcm", "seed": 0, "budget": 0.9, "hits": faithful, "agree": "1" * 200}]
    (tmp_path / "quality-x.json").write_text(json.dumps({"rows": rows, "unpruned": {"hits": unpruned}}))
    monkeypatch.setattr(cd, "RESULTS", tmp_path)
    data = cd.analyse(["kcm"], {"x": "quality-x.json"})
    above = data["tasks"]["x"]["vs_unpruned"]
    assert above["random"]["0.9"]["difference"] == pytest.approx(0.3)
    assert above["kcm"]["0.9"]["difference"] == 0.0 and cd.verdict(above["random"]["0.9"]) == "ahead"
    text = cd.markdown({**data, "family": "text"})
    assert "0.9 vs random, which is itself +30.0 [" in text
    assert "accuracy minus the unpruned model's on the same texts" in text


def test_the_allocation_blend_keeps_the_total_and_moves_toward_uniform():
    """``bench_lm_allocation_blend.blended_counts``: alpha 0 is the allocation itself, alpha 1 a uniform
    cut, and every blend keeps the total (so the FLOPs) and no layer above its width."""
    from bench_lm_allocation_blend import blended_counts
    counts, widths = [10, 0, 5], [10, 10, 10]
    assert blended_counts(counts, widths, 0.0) == counts
    assert blended_counts(counts, widths, 1.0) == [5, 5, 5]
    assert blended_counts(counts, widths, 0.5) == [8, 2, 5]          # 7.5, 2.5, 5: the tie goes to the first
    assert blended_counts([10, 10, 1], [10, 10, 10], 0.4) == [9, 9, 3]  # 8.8, 8.8, 3.4 rounded to total 21
    assert blended_counts([10, 10, 10], [10, 10, 10], 0.7) == [10, 10, 10]
