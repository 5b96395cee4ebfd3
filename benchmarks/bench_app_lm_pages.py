"""What the Neuron scores and Kernel hull pages compute on the real LM demo (SmolLM2-135M, 30 layers,
1536 MLP neurons each), cold and then from the disk cache, the way the app computes it.

    python benchmarks/bench_app_lm_pages.py [--layer 0]

Cold: an empty result store and an empty app disk cache (``kcm_app.disk_cache``, pointed at a
temporary folder for this run, so the user's cache is untouched): the default
method's scores (KCM: R2 for every layer, activation statistics on the calibration blocks), the PCA
and the UMAP of one layer. Warm: a fresh result store (a restarted server) reading the same disk
cache. Writes benchmarks/results/app_lm_pages.json and .md. Needs the LM demo
(``python -m kcm_core demo prepare lm``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_line, run_environment, on_lm_demo, timed, write_results  # noqa: E402



def measure(layer: int, cache: Path) -> dict:
    from kcm_app import background, disk_cache, engine, resources
    disk_cache.root = lambda: cache / "v1"          # this run's own disk cache
    from kcm_app.sources import LM_CALIBRATION_BLOCKS, DataChoice, ModelChoice, SampleChoice
    from kcm_app.store import SharedStore

    ws, load_s = timed(lambda: resources.workspace(ModelChoice("demo-lm"), DataChoice("demo-lm"),
                                                   SampleChoice(LM_CALIBRATION_BLOCKS, 256, 0)))
    config = background.default_config(ws, 0)
    out = {"workspace_s": load_s, "layers": len(ws.model.model.layers), "method": config.method,
           "cache_files_before": disk_cache.usage()[0]}
    for phase in ("cold", "warm"):
        store = SharedStore(max_entries=64)
        scores, scores_s = timed(lambda: engine.method_scores(ws, config, store))
        _, pca_s = timed(lambda: engine.layer_pca(ws, layer, store))
        _, umap_s = timed(lambda: engine.layer_umap(ws, layer, 0, store))
        out[phase] = {"scores_s": scores_s, "pca_s": pca_s, "umap_s": umap_s,
                      "score_stages_s": dict(scores.seconds or {})}
    out["cache_files_after"] = disk_cache.usage()[0]
    return out


def markdown(data: dict) -> str:
    r, env = data["result"], data["environment"]
    rows = [("Neuron scores: the default method's scores, all layers", "scores_s"),
            (f"Kernel hull: PCA of layer {data['settings']['layer']}", "pca_s"),
            (f"Kernel hull: UMAP of layer {data['settings']['layer']}", "umap_s")]
    lines = ["# The Scores and Kernel hull pages' work on the LM demo", "",
             f"SmolLM2-135M ({r['layers']} layers, 1536 MLP neurons each), method `{r['method']}`, the "
             "app's calibration blocks. Cold: empty store and empty disk cache; warm: a fresh store (a "
             "restarted server) reading the disk cache the cold pass wrote. Workspace load "
             f"{r['workspace_s']:.1f} s.", "",
             "| work | cold (s) | warm, from disk (s) |", "|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {r['cold'][key]:.1f} | {r['warm'][key]:.2f} |")
    lines += ["", machine_line(env),
              f"Command: `{env.get('command') or data['settings']['command']}`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=0)
    args = parser.parse_args()
    measured = on_lm_demo(lambda cache: measure(args.layer, cache))
    if measured is None:
        return 2
    result, load_before = measured
    data = {"settings": {"layer": args.layer, "command": " ".join(["python"] + sys.argv)},
            "result": result, "environment": run_environment(load_before)}
    print(write_results("app_lm_pages", data, markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
