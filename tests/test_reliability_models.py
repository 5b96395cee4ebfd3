"""Damaged and ill-fitting models, resource limits and bad numbers: one clear error, nothing written.

Each damaged model is the suite's tiny BERT classifier (``app_tiny``: 64 positions) saved to a
temporary folder and then broken on disk: a truncated or garbage ``model.safetensors``, a config
that describes more or fewer layers or other sizes than the weights, a bare encoder whose config
names a classifier, a ``pytorch_model.bin`` that would run code when unpickled. Every one goes
through ``load_model`` (a ``ValueError`` with the expected words) and through the CLI (exit code 2,
one line on stderr, no ``--out`` folder and no ``--json`` file). Then the CLI's numbers
(``--seq-len``, ``--multiple``, ``--max-len``), its OS-error handling, and the app's error display
and its max-length default on a model with 64 positions.
"""
from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from streamlit.testing.v1 import AppTest

from app_tiny import GOOD, OTHER, write_tiny
from kcm_core import cli
from kcm_core.cli import commands
from kcm_core.arch import model_shape
from kcm_core.flops import keep_count, relative_flops
from kcm_core.models import load_model
from kcm_core.scores import random_scores
from kcm_core.select import select

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, short-text CSV, long-text CSV): texts of the long one exceed 64 tokens."""
    root = tmp_path_factory.mktemp("reliability-models")
    model_dir, csv = write_tiny(root)
    long_text = " ".join((OTHER * 4)[:90])
    rows = ["text,label"] + [f"{long_text} {GOOD[i % len(GOOD)]} .,{i % 2}" for i in range(40)]
    (root / "long.csv").write_text("\n".join(rows) + "\n")
    return model_dir, csv, root / "long.csv"


def copy_model(tiny, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(tiny[0], target)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


class RunsCode:
    """Unpickling this would create ``path``: ``torch.load(weights_only=True)`` must refuse it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# --------------------------------------------------------------------------- damage, one way each

def truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"these are not weights " * 40)


def empty(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def more_layers(folder: Path) -> None:
    edit_config(folder, num_hidden_layers=3)           # the weights hold 2


def fewer_layers(folder: Path) -> None:
    edit_config(folder, num_hidden_layers=1)


def other_width(folder: Path) -> None:
    edit_config(folder, intermediate_size=41)          # the weights are 37 wide


def bare_encoder_named_classifier(folder: Path) -> None:
    config = T.BertConfig.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    T.BertModel(config).save_pretrained(folder)        # weights without classifier.*
    edit_config(folder, architectures=["BertForSequenceClassification"])


def classifier_named_bare(folder: Path) -> None:
    edit_config(folder, architectures=["BertModel"])   # the weights still hold classifier.*


def malicious_pickle(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": RunsCode(folder / "PWNED")},
               folder / "pytorch_model.bin")


def garbage_pickle(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle " * 40)


DAMAGE = {
    "truncated safetensors": (truncate, "weights file of {m} is damaged or incomplete"),
    "garbage safetensors": (garbage, "weights file of {m} is damaged or incomplete"),
    "empty safetensors": (empty, "weights file of {m} is damaged or incomplete"),
    "config with more layers": (more_layers, "{m} lacks weights that BertForSequenceClassification needs "
                                             "(bert.encoder.layer.2."),
    "config with fewer layers": (fewer_layers, "{m} holds weights that BertForSequenceClassification does "
                                               "not use (bert.encoder.layer.1."),
    "config with other FFN width": (other_width, "do not have the shapes its config describes (6 tensors, e.g. "
                                                 "bert.encoder.layer.0.intermediate.dense.bias: (37,) in the "
                                                 "file, (41,) in BertForSequenceClassification)"),
    "bare encoder, config names a classifier": (bare_encoder_named_classifier,
                                                "{m} has no weights for the head of "
                                                "BertForSequenceClassification (classifier.bias, "
                                                "classifier.weight)"),
    "classifier weights, config names BertModel": (classifier_named_bare,
                                                   "{m} holds head weights that BertModel does not use "
                                                   "(classifier.bias, classifier.weight)"),
    "pickle that runs code": (malicious_pickle, "refused to load the pickled weights (pytorch_model.bin) "
                                                "of {m}: it calls for the Python object "),
    "garbage pickle": (garbage_pickle, "refused to load the pickled weights (pytorch_model.bin) of {m}: "
                                       "Unsupported operand"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_model_is_one_clear_error_in_load_model(tiny, tmp_path, case):
    damage, words = DAMAGE[case]
    folder = copy_model(tiny, tmp_path)
    damage(folder)
    with pytest.raises(ValueError) as err:
        load_model(folder, device="cpu")
    message = str(err.value)
    assert words.format(m=folder) in message
    assert "\n" not in message and len(message) < 500
    assert not (folder / "PWNED").exists()              # the pickle's code never ran


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_model_is_one_line_exit_2_in_the_cli(tiny, tmp_path, capsys, case):
    damage, words = DAMAGE[case]
    folder = copy_model(tiny, tmp_path)
    damage(folder)
    before = sorted(p.name for p in folder.iterdir())
    code, out, err = run_cli(capsys, "prune", "--model", folder, "--data", tiny[1], "--flops", 0.9,
                             "--out", tmp_path / "out", "--json", tmp_path / "report.json")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words.format(m=folder) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]     # no --out, no --json, no temp
    assert sorted(p.name for p in folder.iterdir()) == before and "PWNED" not in before


def test_a_bare_encoder_gets_a_head_only_when_asked(tiny, tmp_path):
    folder = tmp_path / "bare"
    T.BertModel(T.BertConfig.from_pretrained(tiny[0])).save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(tiny[0]).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"has no weights for the head of BertForSequenceClassification "
                                         r"\(classifier\.bias, classifier\.weight\), so it would be random: "
                                         r"load it as what it was saved as \(BertModel, no task given\), or "
                                         r"pass allow_new_head=True"):
        load_model(folder, task="sequence-classification", device="cpu")
    model, _ = load_model(folder, task="sequence-classification", device="cpu", allow_new_head=True)
    assert type(model).__name__ == "BertForSequenceClassification"


# --------------------------------------------------------------------------- a pruned (per-layer) folder

@pytest.fixture(scope="module")
def pruned(tiny, tmp_path_factory):
    """A per-layer export, the input of the damage tests (its reload check runs in this process: the
    fresh one is tested in test_export.py)."""
    from conftest import reload_in_process
    out = tmp_path_factory.mktemp("pruned") / "pruned"
    with pytest.MonkeyPatch.context() as patch:
        reload_in_process(patch)
        code = cli.main(["prune", "--model", str(tiny[0]), "--data", str(tiny[1]), "--flops", "0.9",
                         "--max-len", "32", "--out", str(out)])
    assert code == 0
    assert json.loads((out / "config.json").read_text()).get("kcm_ffn_widths")     # the per-layer loader
    return out


@pytest.mark.parametrize("file, content, words", [
    ("model.safetensors", "TRUNCATE", "weights file of {m} is damaged or incomplete"),
    ("kcm_plan.json", "[]", "{m}/kcm_plan.json is damaged (TypeError"),
    ("report.json", "[]", "{m}/report.json is damaged (AttributeError"),
])
def test_export_of_a_damaged_pruned_folder_is_one_line(pruned, tmp_path, capsys, file, content, words):
    folder = tmp_path / "pruned"
    shutil.copytree(pruned, folder)
    if content == "TRUNCATE":
        truncate(folder)
    else:
        (folder / file).write_text(content)
    code, out, err = run_cli(capsys, "export", "--model", folder, "--out", tmp_path / "again",
                             "--format", "hf")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert words.format(m=folder) in err
    assert not (tmp_path / "again").exists()


# --------------------------------------------------------------------------- NaN weights

@pytest.fixture(scope="module")
def nan_model(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan") / "nan"
    shutil.copytree(tiny[0], folder)
    model = T.BertForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", [["evaluate", "--data", "CSV", "--label-column", "label"],
                                     ["export", "--out", "OUT", "--format", "hf"]])
def test_evaluate_and_export_refuse_nan_weights(tiny, nan_model, tmp_path, capsys, command):
    argv = [{"CSV": tiny[1], "OUT": tmp_path / "out"}.get(a, a) for a in command]
    code, out, err = run_cli(capsys, argv[0], "--model", nan_model, *argv[1:])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "NaN or infinite weights in 'bert.encoder.layer.0.output.dense.weight'" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- numbers on the command line

@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_flops_seq_len_must_be_positive(tiny, capsys, value):
    code, out, err = run_cli(capsys, "flops", "--model", tiny[0], f"--seq-len={value}")
    assert code == 2 and out == ""
    assert err == (f"error: argument --seq-len: must be a positive number, got {value!r} "
                   "(see python -m kcm_core flops --help)\n")


@pytest.mark.parametrize("option, value", [("--max-len", "0"), ("--batch-size", "-3"), ("--samples", "0"),
                                           ("--multiple", "0")])
def test_prune_counts_must_be_positive(tiny, tmp_path, capsys, option, value):
    code, out, err = run_cli(capsys, "prune", "--model", tiny[0], "--data", tiny[1], "--flops", 0.9,
                             "--out", tmp_path / "out", f"{option}={value}")
    assert code == 2 and out == ""
    assert err == (f"error: argument {option}: must be a positive whole number, got {value!r} "
                   "(see python -m kcm_core prune --help)\n")
    assert list(tmp_path.iterdir()) == []


def test_multiple_wider_than_every_layer_is_refused_before_scoring(tiny, tmp_path, capsys):
    code, out, err = run_cli(capsys, "prune", "--model", tiny[0], "--data", tiny[1], "--flops", 0.9,
                             "--multiple", 1000, "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert err == ("error: multiple 1000 is larger than the widest FFN layer (37 neurons), so every layer "
                   "would be kept whole or emptied; choose a multiple of at most 37\n")   # no R2 progress
    assert list(tmp_path.iterdir()) == []


def test_multiple_that_would_empty_every_layer_is_refused(tiny, tmp_path, capsys):
    shape = model_shape(T.AutoConfig.from_pretrained(tiny[0]))
    # halfway between keeping 10 and 11 neurons in all
    budget = (relative_flops(shape, 10.0, [5, 5]) + relative_flops(shape, 10.0, [6, 5])) / 2
    assert keep_count(shape, 10.0, budget) == 10
    with pytest.raises(ValueError, match=r"multiple 16 empties every layer at budget .*: the budget keeps "
                                         r"10 neurons \(5 per layer\), fewer than one group of 16"):
        select(random_scores(shape.ffn_width, seed=0), shape, budget, 10.0, multiple=16)
    code, out, err = run_cli(capsys, "prune", "--model", tiny[0], "--data", tiny[1], "--flops", budget,
                             "--seq-len", 10, "--multiple", 16, "--max-len", 32, "--out", tmp_path / "out")
    assert code == 2 and out == "" and "error: multiple 16 empties every layer" in err.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["evaluate", "prune"])
def test_max_len_beyond_the_models_positions_is_refused(tiny, tmp_path, capsys, command):
    extra = ["--flops", "0.9", "--out", str(tmp_path / "out")] if command == "prune" else []
    code, out, err = run_cli(capsys, command, "--model", tiny[0], "--data", tiny[2], "--label-column", "label",
                             "--max-len", 512, *extra)
    assert code == 2 and out == ""
    assert err == ("error: --max-len 512 is longer than this model takes (64 positions); choose --max-len "
                   "64 or less\n")
    assert list(tmp_path.iterdir()) == []


def test_default_max_len_fits_a_model_with_64_positions(tiny, capsys):
    """The default 128 used to reach the model with 94-token texts and crash in its embeddings."""
    code, out, err = run_cli(capsys, "evaluate", "--model", tiny[0], "--data", tiny[2],
                             "--label-column", "label")
    assert code == 0, err
    assert json.loads(out)["examples"] == 40


# --------------------------------------------------------------------------- main's error handling

@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"),
     "error: no space left on device writing /data/out/model.safetensors; free some space or write elsewhere"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/report.json"),
     "error: Permission denied: /data/report.json"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/folder"), "error: Is a directory: /data/folder"),
    (pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                            "`False` will likely succeed\n\nUnsupported operand 103\n"),
     "error: refused to load the pickled weights (pytorch_model.bin) of the model: Unsupported operand 103; "
     "it is damaged or holds Python objects whose loading could run code, so use a trusted copy saved as "
     "model.safetensors"),
    ("SAFETENSORS", "error: the weights file of the model is damaged or incomplete (safetensors: Error while "
                    "deserializing header: header too small); copy or download the model again"),
])
def test_main_turns_os_and_file_errors_into_one_line(tiny, capsys, monkeypatch, error, line):
    if error == "SAFETENSORS":
        from safetensors import SafetensorError
        error = SafetensorError("Error while deserializing header: header too small")

    def fail(args):
        raise error
    monkeypatch.setattr(commands, "cmd_flops", fail)
    code, out, err = run_cli(capsys, "flops", "--model", tiny[0])
    assert code == 2 and out == ""
    assert err == line + "\n"


# --------------------------------------------------------------------------- the app

def _raises_in_core_errors():
    import pickle as pickle_
    import streamlit as st
    from safetensors import SafetensorError
    from kcm_app import ui
    kind = st.query_params.get("kind")
    with ui.core_errors(stop=False):
        if kind == "safetensors":
            raise SafetensorError("Error while deserializing header: incomplete metadata")
        raise pickle_.UnpicklingError("Weights only load failed.\nTrying to load unsupported GLOBAL "
                                      "builtins.open whose module builtins is blocked.\n")
    st.write("after")


@pytest.mark.parametrize("kind, message", [
    ("safetensors", "the weights file of the model is damaged or incomplete (safetensors: Error while "
                    "deserializing header: incomplete metadata); copy or download the model again"),
    ("pickle", "refused to load the pickled weights (pytorch_model.bin) of the model: it calls for the "
               "Python object builtins.open; it is damaged or holds Python objects whose loading could run "
               "code, so use a trusted copy saved as model.safetensors"),
])
def test_app_shows_damaged_file_errors_as_a_message_not_a_trace(kind, message):
    at = AppTest.from_function(_raises_in_core_errors, default_timeout=30)
    at.query_params["kind"] = kind
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == [message]
    assert [m.value for m in at.markdown] == ["after"]                 # stop=False: the page goes on


def test_app_opens_a_model_with_64_positions_and_long_texts(tiny, monkeypatch):
    monkeypatch.setenv("KCM_APP_MODEL", str(tiny[0]))
    monkeypatch.setenv("KCM_APP_DATA", str(tiny[2]))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    slider = at.select_slider(key="max_len")
    assert slider.options == ["32", "64"] and slider.value == 64
    assert at.session_state["workspace"].info.max_len == 64


# --------------------------------------------------------------------------- helpers

def run_cli(capsys, *argv):
    capsys.readouterr()                                 # drop what fixtures printed
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- shard indexes (issue 23, 4 and 7)

def sharded_lm(tmp_path: Path) -> Path:
    """A tiny LLaMA with a tokenizer, saved in three or more shards with an index."""
    from conftest import save_tiny_lm
    folder = save_tiny_lm(tmp_path / "sharded", "llama")
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 3 and (folder / "model.safetensors.index.json").exists()
    return folder


def per_layer_export(tmp_path: Path) -> Path:
    """A per-layer-widths export (``load_pruned`` reads its safetensors itself, not transformers)."""
    from conftest import build_tiny_model
    from kcm_core import KeepPlan, LayerKeep, save_pruned, slice_model
    plan = KeepPlan((LayerKeep((0, 3, 7), 37), LayerKeep(tuple(range(20)), 37)))
    model = slice_model(build_tiny_model("llama", "causal-lm"), plan)
    return save_pruned(model, tmp_path / "export", plan=plan, verify=False).out_dir


def write_index(folder: Path, weight_map) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def readers(folder: Path) -> list:
    """Everything that reads a model folder's weights: in memory, reloading an export, layer by layer."""
    from kcm_core.export import load_pruned
    from kcm_core.streamed.skeleton import Checkpoint
    return [lambda: Checkpoint(folder), lambda: load_pruned(folder), lambda: load_model(folder, device="cpu")]


def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path):
    """Issue 23 (4): ``--stream`` read a layer from ``../outside/...`` and an export whose index named
    ``../../x`` loaded; names are judged as transformers judges them (hub-cache shards are links)."""
    folder = sharded_lm(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    moved = sorted(set(index.values()))[1]
    (tmp_path / "outside").mkdir()
    shutil.move(folder / moved, tmp_path / "outside" / moved)
    write_index(folder, {k: (f"../outside/{v}" if v == moved else v) for k, v in index.items()})
    for read in readers(folder):
        with pytest.raises(ValueError, match=f"names a file outside the model folder \\('../outside/{moved}'\\)"):
            read()
    export = per_layer_export(tmp_path / "e")
    shutil.move(export / "model.safetensors", tmp_path / "x.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        write_index(export, dict.fromkeys(f.keys(), "../../x.safetensors"))
    for read in readers(export):
        with pytest.raises(ValueError, match="names a file outside the model folder \\('../../x.safetensors'\\)"):
            read()


@pytest.mark.parametrize("damage, message", [
    ("no-weight-map", "has no weight_map \\(the table naming the file of every tensor\\)"),
    ("not-json", "is not valid JSON"),
    ("missing-shard", "names model-00002-of-0000\\d.safetensors, which is not in"),
])
def test_a_damaged_shard_index_is_one_sentence_naming_it(tmp_path, capsys, damage, message):
    """Issue 23 (7): an index without ``weight_map`` was a ``KeyError`` traceback (in memory and
    ``--stream``), a malformed one a JSON error naming no file, a missing shard under ``--stream``
    said "fix config.json"."""
    folder = sharded_lm(tmp_path)
    index = folder / "model.safetensors.index.json"
    if damage == "no-weight-map":
        index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    elif damage == "not-json":
        index.write_text('{"weight_map": {')
    else:
        sorted(folder.glob("model-*.safetensors"))[1].unlink()
    for read in readers(folder):
        with pytest.raises(ValueError, match=message) as err:
            read()
        assert str(index) in str(err.value)
    from conftest import LM_WORDS
    (tmp_path / "docs.txt").write_text("\n".join(" ".join(LM_WORDS) for _ in range(20)) + "\n")
    capsys.readouterr()
    for stream in ([], ["--stream"]):
        code = cli.main(["prune", "--model", str(folder), "--data", str(tmp_path / "docs.txt"), "--flops", "0.9",
                         "--block-size", "16", "--samples", "4", "--out", str(tmp_path / "out"), *stream])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: the shard index") and err.count("\n") == 1, err
        assert str(index) in err and not (tmp_path / "out").exists()
