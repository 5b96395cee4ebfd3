"""Two tiers: plain ``pytest`` runs the fast one (development), ``bash scripts/test.sh`` (the README's test
command, which ``.ci/run`` calls) runs everything. Checked on the files that set it up."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytest_leaves_out_the_slow_tier(pytestconfig):
    text = (ROOT / "pyproject.toml").read_text()
    addopts = shlex.split(re.search(r'^addopts = "(.*)"$', text, re.M).group(1))
    assert addopts[addopts.index("-m") + 1] == "not slow"
    assert any(line.strip().startswith('"slow:') for line in text.splitlines())       # registered


def test_the_full_command_clears_the_marker_expression():
    lines = [ln for ln in (ROOT / "scripts" / "test.sh").read_text().splitlines() if "pytest" in ln
             and not ln.lstrip().startswith("#")]
    assert len(lines) == 1
    words = shlex.split(lines[0])
    options = words[words.index("pytest") + 1:]               # after `python3 -m pytest`
    assert options[options.index("-m") + 1] == ""
    assert options.index("-m") < options.index("$@")           # a -m given to the script still wins
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("module, marked", [("test_browser.py", "pytestmark = pytest.mark.slow"),
                                            ("test_demo.py", "@pytest.mark.slow\ndef test_prepare_real_demo"),
                                            ("test_demo_lm.py", "@pytest.mark.slow\ndef test_prepare_real_lm_demo"),
                                            ("test_distributed.py", "@pytest.mark.slow\ndef test_accelerate_launch")])
def test_the_real_downloads_browser_and_launchers_are_in_the_slow_tier(module, marked):
    assert marked in (ROOT / "tests" / module).read_text()


def test_the_fast_tier_reloads_exports_in_process_but_keeps_one_fresh_process():
    """Tests that end in an export run twice (``export_reload``): with save_pruned's fresh-process reload
    in the slow tier, with the same reload code in this process in the fast tier. test_export.py keeps
    real fresh processes in the fast tier: its fixture's bert check and the stock-loading process."""
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert '@pytest.fixture(params=[pytest.param("fresh", marks=pytest.mark.slow), "in-process"])\n' \
           "def export_reload(" in conftest
    export = (ROOT / "tests" / "test_export.py").read_text()
    assert 'VERIFIED = ("bert",)' in export
    assert "\ndef test_stock_transformers_loads_uniform_exports_without_project_code(exports, tmp_path)" in export
    assert "@pytest.mark.slow\ndef test_stock_transformers_loads" not in export


def test_the_fast_command_runs_on_two_xdist_workers_that_the_dev_requirements_install():
    readme = (ROOT / "README.md").read_text()
    assert "\npython3 -m pytest -n 2\n" in readme
    assert any(line.startswith("pytest-xdist") for line in (ROOT / "requirements-dev.txt").read_text().splitlines())
