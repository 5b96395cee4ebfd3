"""Data loss and the server's file system (issue 10, first section), and what killed exports leave.

Overwrite replaces only an earlier output of ours (its marker files), never a file, a link, someone's
folder, the source model or the data; the CLI refuses a bad ``--out``/``--json`` before any heavy
work; a full disk is one sentence; the app's shared-server mode confines local paths and exports to
configured roots and never tells a browser whether a path outside them exists; uploads live in a
private per-process folder that is removed at exit. Tests run as root, where permission bits do not
stop writes: unwritable places are a path under a regular file, ``/sys`` or a monkeypatched probe.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import streamlit.config as st_config
import transformers as T
from streamlit.testing.v1 import AppTest

import kcm_core.atomic as A
import kcm_core.export.saving as S
import kcm_core.demos.finetune as F
from app_tiny import write_tiny
from kcm_app import server, sources
from kcm_app.sources import DataChoice
from kcm_core import cli
from kcm_core.cli import common
from kcm_core.atomic import atomic_folder, clean_stale
from kcm_core.data import TextData
from kcm_core.export import save_pruned
from kcm_core.demos.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
NO_SPACE = OSError(errno.ENOSPC, "No space left on device")
TRAIN = TextData(texts=("good film", "bad film") * 4, labels=(1, 0) * 4, label_names=("neg", "pos"),
                 source="toy")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, data.csv) of a tiny BERT classifier, and the model loaded from that folder."""
    model_dir, csv = write_tiny(tmp_path_factory.mktemp("files"))
    model = T.BertForSequenceClassification.from_pretrained(model_dir).eval()
    return model_dir, csv, model


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must survive a refused write."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def a_victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("only copy")
    return victim


# --------------------------------------------------------------------------- library: overwrite rules

def test_overwrite_never_replaces_a_folder_that_is_not_an_export(tiny, tmp_path):
    _, _, model = tiny
    victim = a_victim(tmp_path)
    with pytest.raises(ValueError, match="is not an earlier export .*no export.json or config.json"):
        save_pruned(model, victim, overwrite=True, verify=False)
    assert tree(victim) == {"important.txt": b"only copy"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]          # nothing else written


def test_overwrite_never_turns_a_file_into_a_folder(tiny, tmp_path):
    _, _, model = tiny
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        save_pruned(model, target, overwrite=True, verify=False)
    assert target.read_text() == "keep me"


def test_overwrite_never_follows_a_link(tiny, tmp_path):
    _, _, model = tiny
    real = tmp_path / "real"
    save_pruned(model, real, verify=False)                # a genuine export behind the link
    before = tree(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ValueError, match="is a symbolic link"):
        save_pruned(model, link, overwrite=True, verify=False)
    assert link.is_symlink() and tree(real) == before


@pytest.mark.parametrize("where, relation", [("model", "is"), ("inside", "is inside"),
                                             ("around", "contains")], ids=["is", "inside", "around"])
def test_the_source_model_folder_is_never_an_output(tiny, where, relation):
    model_dir, _, model = tiny
    before = tree(model_dir)
    target = {"model": model_dir, "inside": model_dir / "pruned", "around": model_dir.parent}[where]
    # the folder the model was loaded from is protected without being named (config.name_or_path)
    with pytest.raises(ValueError, match=f"{relation} {model_dir}, which this run reads"):
        save_pruned(model, target, overwrite=True, verify=False)
    assert tree(model_dir) == before and not (model_dir / "pruned").exists()


def test_the_data_file_is_protected_when_named(tiny, tmp_path):
    _, csv, model = tiny
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_bytes(csv.read_bytes())
    with pytest.raises(ValueError, match="contains .*train.csv, which this run reads"):
        save_pruned(model, data, overwrite=True, verify=False, protected=[data / "train.csv"])
    assert tree(data) == {"train.csv": csv.read_bytes()}


def test_a_folder_that_turns_into_something_else_during_the_export_is_kept(tiny, tmp_path, monkeypatch):
    # checked at the door and again just before the final rename
    _, _, model = tiny
    target = tmp_path / "out"
    save_pruned(model, target, verify=False)
    real = S._write_reports

    def swapped(folder, *args):
        real(folder, *args)
        for name in ("export.json", "config.json"):
            (target / name).unlink()
        (target / "important.txt").write_text("someone else's")

    monkeypatch.setattr(S, "_write_reports", swapped)
    with pytest.raises(ValueError, match="is not an earlier export"):
        save_pruned(model, target, overwrite=True, verify=False)
    assert (target / "important.txt").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_path_through_a_file_is_refused_before_the_work(tiny, tmp_path, monkeypatch):
    _, _, model = tiny
    (tmp_path / "plain").write_text("x")
    monkeypatch.setattr(S, "_write", lambda *a: pytest.fail("the work started"))
    with pytest.raises(ValueError, match=r"cannot create output folder .*: .*plain is a file, not a folder"):
        save_pruned(model, tmp_path / "plain" / "sub" / "out", verify=False)
    assert (tmp_path / "plain").read_text() == "x"


def test_an_unwritable_parent_is_refused_before_the_work(tiny, tmp_path, monkeypatch):
    _, _, model = tiny

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(S, "_write", lambda *a: pytest.fail("the work started"))
    monkeypatch.setattr(A.tempfile, "mkdtemp", refused)
    with pytest.raises(ValueError, match="does not accept new files \\(Permission denied\\); choose a "
                                         "folder you can write to"):
        save_pruned(model, tmp_path / "out", verify=False)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_the_export_is_one_sentence_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    _, _, model = tiny
    target = tmp_path / "out"
    save_pruned(model, target, verify=False)
    before = tree(target)

    def full(folder, *args):
        (folder / "partial.bin").write_bytes(b"half")
        raise NO_SPACE

    monkeypatch.setattr(S, "_write_reports", full)
    with pytest.raises(ValueError, match="could not write .*out: No space left on device; nothing was "
                                         "written"):
        save_pruned(model, target, overwrite=True, verify=False)
    assert tree(target) == before                                       # the earlier export survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_seen_by_safetensors_is_the_disk_sentence_not_a_damaged_model(tiny, tmp_path, monkeypatch):
    """Issue 23 (6): safetensors reports ENOSPC as a ``SafetensorError``, which was let through and worded
    as "the weights file of the model is damaged ... download the model again"."""
    import transformers.modeling_utils as MU
    from safetensors import SafetensorError
    _, _, model = tiny
    target = tmp_path / "out"

    def full(state, filename, metadata=None):       # the text safetensors writes for an OS error
        Path(filename).write_bytes(b"half")
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                              f'path "{filename}"')

    monkeypatch.setattr(MU, "safe_save_file", full)
    with pytest.raises(ValueError) as err:
        save_pruned(model, target, verify=False)
    assert str(err.value) == (f"could not write {target}: No space left on device; nothing was written (free "
                              "some space or choose another folder)")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- library: fine-tune outputs

def test_finetune_overwrite_spares_someones_folder_and_an_export(tiny, tmp_path):
    model_dir, _, model = tiny
    victim = a_victim(tmp_path)
    with pytest.raises(ValueError, match="is not an earlier fine-tune output"):
        finetune(str(model_dir), TRAIN, victim, overwrite=True)
    export = tmp_path / "export"
    save_pruned(model, export, verify=False)
    with pytest.raises(ValueError, match="is not an earlier fine-tune output .*no finetune.json"):
        finetune(str(model_dir), TRAIN, export, overwrite=True)
    assert tree(victim) == {"important.txt": b"only copy"} and (export / "export.json").is_file()


def test_finetune_never_writes_over_its_own_model_or_data(tiny, tmp_path):
    model_dir, csv, _ = tiny
    before = tree(model_dir)
    with pytest.raises(ValueError, match=f"output folder {model_dir} is {model_dir}, which this run reads"):
        finetune(str(model_dir), TRAIN, model_dir, overwrite=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_bytes(csv.read_bytes())
    with pytest.raises(ValueError, match="contains .*train.csv, which this run reads"):
        finetune(str(model_dir), TRAIN, data, overwrite=True, protected=[data / "train.csv"])
    assert tree(model_dir) == before and tree(data) == {"train.csv": csv.read_bytes()}


def test_finetune_full_disk_is_one_sentence(tiny, tmp_path, monkeypatch):
    model_dir, _, _ = tiny

    def full(model, tokenizer, summary, folder):
        (folder / "partial.bin").write_bytes(b"half")
        raise NO_SPACE

    monkeypatch.setattr(F, "_save", full)
    with pytest.raises(ValueError, match="No space left on device; nothing was written"):
        finetune(str(model_dir), TRAIN, tmp_path / "clf", FinetuneConfig(epochs=1, batch_size=8,
                                                                         max_len=8))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- killed exports

VERIFYING = """
import sys, types
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import kcm_core.export.verify as V
V.np.savez = lambda *args, **kwargs: None          # the probe stays the FIFO the test made
V.verify(Path(sys.argv[1]), ("hf",), "transformers", types.SimpleNamespace(output="logits"), {}, None, 1.0)
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_the_verification_child_ends_with_the_export_that_started_it(tmp_path, how):
    """Issue 23 (10): ``kill -9`` or SIGTERM during an export orphaned the fresh-process check, which kept
    a second copy of the model in memory while the next export deleted its folder. Here the child blocks
    reading its probe (a FIFO), so only its parent's end can end it."""
    import signal

    import psutil
    os.mkfifo(tmp_path / ".kcm_probe.npz")
    parent = subprocess.Popen([sys.executable, "-c", VERIFYING, str(tmp_path), str(ROOT)])
    started = [parent]
    try:
        for _ in range(300):
            children = psutil.Process(parent.pid).children()
            if children:
                break
            time.sleep(0.1)
        assert children, "the check never started"
        child = children[0]
        started.append(child)
        time.sleep(2)                                   # the child is up and waiting for its probe
        parent.send_signal(getattr(signal, how))
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs([child], timeout=10)
        ended = not alive or alive[0].status() == psutil.STATUS_ZOMBIE
        assert ended, "the verification child outlived its export"
    finally:
        for proc in started:                            # only what this test started, by id
            with contextlib.suppress(Exception):
                proc.kill()

KILLED = """
import os, sys
from kcm_core.atomic import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 2_000_000)
    os.kill(os.getpid(), 9)
"""


def test_a_killed_export_is_cleaned_up_by_the_next_one_to_any_name(tiny, tmp_path):
    _, _, model = tiny
    subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "first")], cwd=ROOT, check=False)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".first.tmp-")         # what kill -9 leaves
    save_pruned(model, tmp_path / "second", verify=False)
    assert [p.name for p in tmp_path.iterdir()] == ["second"]


def test_the_previous_export_moved_aside_by_a_killed_run_is_put_back(tiny, tmp_path):
    # killed between "move the old export aside" and "rename the new one in": the only copy
    _, _, model = tiny
    save_pruned(model, tmp_path / "out", verify=False)
    before = tree(tmp_path / "out")
    aside = tmp_path / f".out.old-{dead_pid()}-1234abcd"
    os.replace(tmp_path / "out", aside)
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        save_pruned(model, tmp_path / "out", verify=False)
    assert tree(tmp_path / "out") == before and not aside.exists()


def test_stale_siblings_of_live_processes_and_lookalikes_are_left_alone(tmp_path):
    live = tmp_path / f".out.tmp-{os.getpid()}-0000abcd"
    lookalike = tmp_path / ".out.tmp-notes"
    for path in (live, lookalike):
        path.mkdir()
    dead = tmp_path / f".other.tmp-{dead_pid()}-0000abcd"
    dead.write_text("half a json")
    assert clean_stale(tmp_path) == [dead]
    assert live.is_dir() and lookalike.is_dir() and not dead.exists()


def test_atomic_folder_refuses_to_replace_a_file_even_with_overwrite(tmp_path):
    target = tmp_path / "plain"
    target.write_text("keep")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        with atomic_folder(target, overwrite=True):
            pass
    assert target.read_text() == "keep"


# --------------------------------------------------------------------------- CLI

@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if a command gets as far as loading a model or data."""
    import kcm_core.data
    import kcm_core.models

    def loaded(*args, **kwargs):
        pytest.fail("heavy work started before the output was checked")

    monkeypatch.setattr(kcm_core.models, "load_model", loaded)
    monkeypatch.setattr(kcm_core.data, "load_text_data", loaded)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def prune_argv(tiny, out, *extra):
    model_dir, csv, _ = tiny
    return ["prune", "--model", model_dir, "--data", csv, "--flops", "0.8", "--out", out, *extra]


@pytest.mark.parametrize("where, message", [
    ("model", "--out {model} is {model}, which this run reads"),
    ("data", "--out {data} is {data}, which this run reads"),
    ("inside", "--out {model}/pruned is inside {model}, which this run reads"),
    ("around", "--out {parent} contains {model}, which this run reads"),
    ("victim", "is not an earlier export (it has no export.json or config.json)"),
    ("file", "is a file, not a folder; overwrite replaces only an earlier export folder"),
    ("through-file", "cannot create --out {tmp}/notes.txt/out: {tmp}/notes.txt is a file, not a folder"),
    ("sys", "cannot write --out /sys/kcm-out: /sys does not accept new files"),
], ids=["model", "data", "inside", "around", "victim", "file", "through-file", "sys"])
def test_prune_refuses_a_bad_out_before_any_work(tiny, tmp_path, capsys, no_heavy_work, where, message):
    model_dir, csv, _ = tiny
    before_model, before_data = tree(model_dir), csv.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    out = {"model": model_dir, "data": csv, "inside": model_dir / "pruned", "around": model_dir.parent,
           "victim": a_victim(tmp_path), "file": notes, "through-file": notes / "out",
           "sys": Path("/sys/kcm-out")}[where]
    code, stdout, err = run_cli(capsys, *prune_argv(tiny, out, "--overwrite"))
    expected = message.format(model=model_dir, data=csv, parent=model_dir.parent, tmp=tmp_path)
    assert (code, stdout) == (2, "")
    assert err.count("\n") == 1 and expected in err, err
    assert tree(model_dir) == before_model and csv.read_bytes() == before_data
    assert notes.read_text() == "keep me" and (tmp_path / "victim" / "important.txt").read_text() == "only copy"


@pytest.mark.parametrize("where, message", [
    ("folder", "--json {tmp} is a folder; give a file name for the JSON report"),
    ("data", "--json {data} is {data}, which this run reads"),
    ("model-config", "--json {model}/config.json is inside {model}, which this run reads"),
    ("through-file", "cannot create --json file {tmp}/plain/r.json: {tmp}/plain is a file"),
    ("out", "is the --out folder; give the JSON its own file name"),
    ("sys", "cannot write --json file /sys/r.json: /sys does not accept new files"),
], ids=["folder", "data", "model-config", "through-file", "out", "sys"])
def test_prune_refuses_a_bad_json_before_any_work(tiny, tmp_path, capsys, no_heavy_work, where, message):
    model_dir, csv, _ = tiny
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "out"
    target = {"folder": tmp_path, "data": csv, "model-config": model_dir / "config.json",
              "through-file": tmp_path / "plain" / "r.json", "out": out, "sys": Path("/sys/r.json")}[where]
    code, stdout, err = run_cli(capsys, *prune_argv(tiny, out, "--json", target))
    assert (code, stdout) == (2, "")
    assert message.format(tmp=tmp_path, data=csv, model=model_dir) in err, err
    assert csv.read_bytes().startswith(b"text,label") and not out.exists()


@pytest.mark.parametrize("command", ["finetune", "export"])
def test_finetune_and_export_refuse_to_write_over_their_model(tiny, capsys, no_heavy_work, command):
    model_dir, csv, _ = tiny
    before = tree(model_dir)
    data = ["--data", csv] if command == "finetune" else []
    code, _, err = run_cli(capsys, command, "--model", model_dir, *data, "--out", model_dir, "--overwrite")
    assert code == 2 and f"--out {model_dir} is {model_dir}, which this run reads" in err
    assert tree(model_dir) == before


def test_a_full_disk_during_a_cli_export_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    model_dir, _, model = tiny
    source = tmp_path / "pruned"
    save_pruned(model, source, tokenizer=T.AutoTokenizer.from_pretrained(model_dir), verify=False)

    def full(model, config, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise NO_SPACE

    monkeypatch.setattr(S, "_write_hf", full)
    code, stdout, err = run_cli(capsys, "export", "--model", source, "--out", tmp_path / "again",
                                "--format", "hf")
    assert (code, stdout) == (2, "")
    assert err.strip().splitlines()[-1] == (f"error: could not write {tmp_path / 'again'}: No space left "
                                            "on device; nothing was written (free some space or choose "
                                            "another folder)")
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_json_written_atomically_and_a_full_disk_loses_nothing(tmp_path, capsys, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text('{"old": true}\n')

    def full(self, *args, **kwargs):
        self.write_bytes(b'{"half')                 # a partial temporary file, then the disk is full
        raise NO_SPACE

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ValueError, match="could not write --json .*report.json: No space left on device "
                                         "\\(the JSON was printed to stdout above\\)"):
        common.json_out({"accuracy": 0.5}, str(target))
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.5}       # nothing lost
    monkeypatch.undo()
    assert target.read_text() == '{"old": true}\n'                         # nor half-written
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_full_disk_writing_json_exits_2_with_the_json_on_stdout(tiny, tmp_path, capsys, monkeypatch):
    model_dir, _, _ = tiny

    def full(self, *args, **kwargs):
        raise NO_SPACE

    monkeypatch.setattr(Path, "write_text", full)
    code, stdout, err = run_cli(capsys, "flops", "--model", model_dir, "--json", tmp_path / "r.json")
    assert code == 2 and json.loads(stdout)["model"] == str(model_dir)
    assert err == (f"error: could not write --json {tmp_path / 'r.json'}: No space left on device (the "
                   "JSON was printed to stdout above)\n")
    assert list(tmp_path.iterdir()) == []


def test_json_turning_into_a_folder_after_the_check_is_one_sentence(tmp_path, capsys):
    (tmp_path / "report.json").mkdir()
    with pytest.raises(ValueError, match="could not write --json .*report.json: Is a directory"):
        common.json_out({"a": 1}, str(tmp_path / "report.json"))
    assert json.loads(capsys.readouterr().out) == {"a": 1}


# --------------------------------------------------------------------------- shared-server settings

def shared(tmp_path: Path, **env) -> server.ServerSettings:
    return server.settings({"KCM_SHARED_SERVER": "1", "KCM_ALLOWED_ROOTS": str(tmp_path), **env})


def test_single_user_default_allows_any_path(tmp_path):
    config = server.settings({})
    assert not config.shared and config.allow_hub and config.allow_uploads
    assert server.confine("/etc", "model folder", config) == "/etc"
    assert server.export_folder("out/x", config) == Path("out/x").resolve()


@pytest.mark.parametrize("ref", ["/etc", "/etc/passwd", "/no/such/path", "../../etc/passwd",
                                 "~/.ssh/id_rsa"], ids=["dir", "file", "missing", "dotdot", "tilde"])
def test_outside_the_roots_gives_one_sentence_that_reveals_nothing(tmp_path, ref):
    config = shared(tmp_path)
    with pytest.raises(ValueError) as err:
        server.confine(ref, "data file", config)
    assert str(err.value) == (f"data files must lie inside {tmp_path.resolve()} on this shared server; "
                              f"{ref!r} does not")


def test_a_link_inside_a_root_to_a_file_outside_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "passwd.csv").symlink_to("/etc/passwd")
    config = shared(root)
    with pytest.raises(ValueError, match="must lie inside"):
        server.confine(str(root / "passwd.csv"), "data file", config)
    assert server.confine("sub/data.csv", "data file", config) == str(root.resolve() / "sub/data.csv")


def test_a_model_folder_inside_a_root_whose_files_link_out_is_refused(tmp_path, monkeypatch):
    """Issue 23 (4): the folder itself lay inside the root, so it was read, links and all."""
    from kcm_app import resources
    from kcm_app.sources import ModelChoice
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "model").mkdir(parents=True)
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"secret")
    (root / "model" / "config.json").write_text("{}")
    monkeypatch.setenv("KCM_SHARED_SERVER", "1")
    monkeypatch.setenv("KCM_ALLOWED_ROOTS", str(root))
    choice = ModelChoice("folder", "model")
    assert resources.model_path(choice) == str(root.resolve() / "model")
    (root / "model" / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(ValueError) as err:
        resources.model_path(choice)
    assert str(err.value) == (f"model folders must lie inside {root.resolve()} on this shared server; 'model' "
                              "holds model.safetensors, a link to somewhere else")
    (root / "model" / "model.safetensors").unlink()
    (root / "model" / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="holds sub, a link to somewhere else"):
        resources.model_path(choice)
    # a single user's folders (hub-cache snapshots are links into ../../blobs) are read as they are
    monkeypatch.setenv("KCM_SHARED_SERVER", "0")
    assert resources.model_path(ModelChoice("folder", str(root / "model"))) == str(root / "model")


@pytest.mark.parametrize("env, call, message", [
    ({"KCM_ALLOWED_ROOTS": ""}, lambda c: server.confine("/x", "model folder", c),
     "model folders on this machine are turned off on this shared server"),
    ({"KCM_ALLOWED_ROOTS": ""}, lambda c: server.export_folder("out", c),
     "exports are turned off on this shared server"),
    ({}, lambda c: server.check_hub("model", c), "hub models are turned off on this shared server"),
    ({"KCM_ALLOW_UPLOADS": "0"}, server.check_uploads, "uploads are turned off on this shared server"),
    ({}, lambda c: server.export_folder("/tmp/elsewhere", c), "export folders must lie inside"),
], ids=["no-roots-local", "no-roots-export", "hub-off", "uploads-off", "export-outside"])
def test_shared_mode_switches(tmp_path, env, call, message):
    with pytest.raises(ValueError, match=message):
        call(shared(tmp_path, **env))


@pytest.mark.parametrize("env, message", [
    ({"KCM_SHARED_SERVER": "maybe"}, "KCM_SHARED_SERVER must be 0 or 1, got 'maybe'"),
    ({"KCM_SHARED_SERVER": "1", "KCM_ALLOWED_ROOTS": "/no/such/root"},
     "KCM_ALLOWED_ROOTS names /no/such/root, which is not a folder"),
], ids=["bad-switch", "missing-root"])
def test_a_malformed_setting_fails_closed(env, message):
    with pytest.raises(ValueError, match=message):
        server.settings(env)


def test_an_upload_ref_must_be_this_servers_upload(tmp_path, monkeypatch):
    from kcm_app import resources
    monkeypatch.setenv("KCM_SHARED_SERVER", "1")
    monkeypatch.setenv("KCM_ALLOWED_ROOTS", str(tmp_path))
    with pytest.raises(ValueError, match="that upload is no longer on this server"):
        resources.data_source(DataChoice("upload", "/etc/passwd"))
    mine = sources.upload_path("a.csv", b"text\nhi\n", sources.upload_dir())
    assert resources.data_source(DataChoice("upload", str(mine))) == str(mine)


@pytest.mark.parametrize("ref", ["/etc", "/etc/passwd", "../outside/model", "~/.ssh", "outside/data.csv",
                                 "outside", "kcm_core", "data.csv"])
def test_a_shared_hub_reference_never_resolves_on_this_machine(tmp_path, monkeypatch, ref):
    """Issue 23 (1): with the hub on, a "hub id" or "hub dataset" was tried as a local path first
    (``from_pretrained``, ``load_dataset``, ``load_text_data``), so it read any folder or file the server
    could, past the roots. In shared mode it must be a hub id naming nothing here; refused before any read."""
    from kcm_app import resources
    from kcm_app.sources import ModelChoice
    (tmp_path / "outside").mkdir()
    (tmp_path / "data.csv").write_text("text\nhi\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kcm_core").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    for name, value in {"KCM_SHARED_SERVER": "1", "KCM_ALLOWED_ROOTS": str(root), "KCM_ALLOW_HUB": "1"}.items():
        monkeypatch.setenv(name, value)
    message = f"hub models must be given as a hub id (name or owner/name) on this shared server; {ref!r} is not one"
    with pytest.raises(ValueError) as err:
        resources.model_path(ModelChoice("hub", ref))
    assert str(err.value) == message
    with pytest.raises(ValueError, match="hub datasets must be given as a hub id"):
        resources.data_source(DataChoice("hub", ref))
    # real hub ids pass; outside shared mode any reference passes as before
    assert resources.model_path(ModelChoice("hub", " openai-community/gpt2 ")) == "openai-community/gpt2"
    assert resources.data_source(DataChoice("hub", "stanfordnlp/imdb")) == "stanfordnlp/imdb"
    monkeypatch.setenv("KCM_SHARED_SERVER", "0")
    assert resources.model_path(ModelChoice("hub", ref)) == ref


# --------------------------------------------------------------------------- uploads

def test_uploads_go_to_a_private_folder_with_private_files(monkeypatch):
    monkeypatch.setattr(sources, "_uploads", None)
    folder = sources.upload_dir()
    assert folder.name.startswith("kcm-uploads-") and folder.parent == Path(tempfile.gettempdir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and sources.upload_dir() == folder
    path = sources.upload_path("reviews.csv", b"text\nhi\n", folder)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["reviews.csv"]      # no .part left


def test_a_replaced_upload_folder_is_not_trusted(monkeypatch):
    monkeypatch.setattr(sources, "_uploads", None)
    first = sources.upload_dir()
    first.chmod(0o755)                      # no longer private: someone else could have put files in
    second = sources.upload_dir()
    assert second != first and stat.S_IMODE(second.stat().st_mode) == 0o700


def test_uploads_are_removed_when_the_server_exits():
    code = ("from kcm_app.sources import upload_dir, upload_path\n"
            "print(upload_path('a.csv', b'text\\nhi\\n', upload_dir()).parent.parent)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    folder = Path(done.stdout.strip())
    assert folder.name.startswith("kcm-uploads-") and not folder.exists()


# --------------------------------------------------------------------------- the app in shared mode

@pytest.fixture
def shared_app(tmp_path, monkeypatch):
    """The app on a tiny model inside one allowed root, in shared-server mode."""
    root = tmp_path / "root"
    model_dir, csv = write_tiny(root)
    for key, value in {"KCM_APP_MODEL": str(model_dir), "KCM_APP_DATA": str(csv),
                       "KCM_SHARED_SERVER": "1", "KCM_ALLOWED_ROOTS": str(root)}.items():
        monkeypatch.setenv(key, value)
    before = st_config.get_option("client.showErrorDetails")

    def make(page: str | None = None) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=120)
        at.query_params.update({"budget": "0.8"})
        at.run()
        if page:
            at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at
    yield make, root
    st_config.set_option("client.showErrorDetails", before)


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_shared_app_starts_on_the_operators_model_and_hides_error_details(shared_app):
    make, root = shared_app
    at = make()
    assert not errors(at) and str(root) in at.session_state["workspace"].model_key   # not the demo
    assert st_config.get_option("client.showErrorDetails") == "none"
    assert any("Shared server: local paths inside" in c.value for c in at.sidebar.caption)


def test_shared_app_leaves_clearing_the_disk_cache_to_the_operator(shared_app):
    """Issue 23 (13): every participant saw "Clear the disk cache", one click emptying it for the server."""
    make, _ = shared_app
    at = make()
    assert "Disk cache" in [h.value for h in at.subheader]
    assert "clear_disk_cache" not in [b.key for b in at.button]
    assert any("only its operator clears the cache" in c.value for c in at.caption)


@pytest.mark.parametrize("kind, key, existing, missing", [
    ("folder", "model_ref", "/etc", "/etc/no-such-folder"),
    ("file", "data_ref", "/etc/passwd", "/etc/no-such-file.csv"),
], ids=["model-folder", "data-file"])
def test_shared_app_says_the_same_for_existing_and_missing_paths_outside(shared_app, kind, key,
                                                                        existing, missing):
    make, root = shared_app
    at = make()
    radio = "model_kind" if key == "model_ref" else "data_kind"
    at.radio(key=radio).set_value(kind).run()
    said = []
    for ref in (existing, missing):
        at.text_input(key=key).set_value(ref).run()
        assert not at.exception, [e.value for e in at.exception]
        said.append([m.replace(repr(ref), "<ref>") for m in errors(at)])
    assert said[0] == said[1] and len(said[0]) == 1, said
    assert "must lie inside" in said[0][0] and "root:" not in said[0][0]   # no content, no columns


def test_shared_app_refuses_hub_models(shared_app):
    make, _ = shared_app
    at = make()
    at.radio(key="model_kind").set_value("hub").run()
    at.text_input(key="model_ref").set_value("bert-base-uncased").run()
    assert any("hub models are turned off on this shared server" in m for m in errors(at)), errors(at)


def test_shared_app_export_outside_the_roots_writes_nothing(shared_app, tmp_path):
    make, root = shared_app
    at = make("pages/6_export.py")
    at.text_input(key="export_dir").set_value("out/inside").run()
    assert any(f"Writes to `{root.resolve() / 'out' / 'inside'}`" in c.value for c in at.caption)
    outside = tmp_path / "elsewhere"
    at.text_input(key="export_dir").set_value(str(outside)).run()
    at.button(key="export_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("export folders must lie inside" in w.value for w in at.warning)
    assert not outside.exists() and not (root / "out").exists()


def test_zip_holds_only_what_the_export_wrote(tmp_path):
    import io
    import zipfile
    from kcm_app.views.export import zip_folder
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "secret").symlink_to("/etc/passwd")
    names = zipfile.ZipFile(io.BytesIO(zip_folder(folder, ["config.json", "secret", "../x"]))).namelist()
    assert names == ["out/config.json"]
