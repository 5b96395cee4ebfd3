"""kcm_core is a plain library: importing it pulls in no Streamlit (nor the app glue), it never prints,
and it never hard-codes a CUDA device."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "kcm_core"
SOURCES = sorted(CORE.rglob("*.py"))          # every folder: export/, cli/, demos/, streamed/


def _rel(path: Path) -> str:
    return path.relative_to(CORE).as_posix()


# The command line's job is to print (and the demos' preparation is the CLI's, too); nothing else may,
# but for the script export/verify.py runs in a fresh process, whose stdout is its channel back.
PRINT_ALLOWED_FOLDERS = ("cli/", "demos/")
PRINT_ALLOWED = {"__main__.py", "export/reload_check.py"}
# The one place that may name a CUDA device: choosing a default after torch.cuda.is_available().
CUDA_ALLOWED = {("runtime.py", "default_device")}

_PROBE = r"""
import importlib, json, pkgutil, sys
import kcm_core
after_package = sorted(m for m in sys.modules if m.split(".")[0] in ("streamlit", "kcm_app"))
for info in pkgutil.walk_packages(kcm_core.__path__, "kcm_core."):
    if info.name != "kcm_core.__main__":
        importlib.import_module(info.name)
after_all = sorted(m for m in sys.modules if m.split(".")[0] in ("streamlit", "kcm_app"))
json.dump({"package": after_package, "all": after_all,
           "loaded": sorted(m for m in sys.modules if m.startswith("kcm_core."))}, sys.stdout)
"""


def test_importing_kcm_core_does_not_import_streamlit():
    import importlib.util
    assert importlib.util.find_spec("streamlit") is not None     # installed, so the check can fail
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["package"] == []
    assert result["all"] == []
    assert "kcm_core.pipeline" in result["loaded"] and "kcm_core.hull" in result["loaded"]
    assert {"kcm_core.export.verify", "kcm_core.cli.commands", "kcm_core.demos.artifacts",
            "kcm_core.streamed.skeleton"} <= set(result["loaded"])                  # every folder was imported


def _calls(tree: ast.AST):
    """(call node, name of the enclosing function or None) for every call in ``tree``."""
    def walk(node, func):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                yield child, func
            yield from walk(child, name)
    yield from walk(tree, None)


def _is_cuda_literal(node) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.split(":")[0].strip().lower() == "cuda")


@pytest.mark.parametrize("path", [p for p in SOURCES if _rel(p) not in PRINT_ALLOWED
                                  and not _rel(p).startswith(PRINT_ALLOWED_FOLDERS)], ids=_rel)
def test_no_print_calls(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    prints = [call.lineno for call, _ in _calls(tree)
              if isinstance(call.func, ast.Name) and call.func.id == "print"]
    assert prints == [], f"{_rel(path)} calls print() on lines {prints}"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_hard_coded_cuda(path):
    """No ``torch.device("cuda")``, ``.to("cuda")``, ``device="cuda"`` or ``.cuda()`` outside the
    device-choosing helper; "cuda" inside messages or docstrings is fine."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for call, func in _calls(tree):
        args = list(call.args) + [k.value for k in call.keywords]
        hard = any(_is_cuda_literal(a) for a in args)
        hard |= isinstance(call.func, ast.Attribute) and call.func.attr == "cuda"
        if hard and (_rel(path), func) not in CUDA_ALLOWED:
            found.append(call.lineno)
    for node in ast.walk(tree):     # defaults such as def f(device="cuda")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
            found += [d.lineno for d in defaults if _is_cuda_literal(d)]
    assert found == [], f"{_rel(path)} hard-codes a CUDA device on lines {found}"


def test_the_checks_can_fail():
    bad = ast.parse('import torch\ndef f(x, device="cuda:0"):\n    print(x)\n'
                    '    return x.to("cuda"), x.cuda(), torch.device("cuda")\n')
    calls = list(_calls(bad))
    assert sum(isinstance(c.func, ast.Name) and c.func.id == "print" for c, _ in calls) == 1
    cuda = [c for c, _ in calls if any(_is_cuda_literal(a) for a in c.args)
            or (isinstance(c.func, ast.Attribute) and c.func.attr == "cuda")]
    assert len(cuda) == 3 and {f for _, f in calls} == {"f"}
    assert _is_cuda_literal(bad.body[1].args.defaults[0])
