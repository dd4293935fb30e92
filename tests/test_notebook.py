"""The quickstart notebook is valid nbformat-4 JSON and every script call in it uses flags the scripts accept."""
import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
SCRIPTS = ("locate_layers.py", "train_sv.py", "finetune.py", "evaluate.py")


def notebook_calls():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and nb["cells"]
    calls = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and "execution_count" in cell
            for line in "".join(cell["source"]).splitlines():
                match = re.match(r"!python (\S+\.py)(.*)", line.strip())
                if match and match.group(1) in SCRIPTS:
                    calls.append((match.group(1), shlex.split(match.group(2))))
    return calls


def accepted_flags(name):
    out = subprocess.run([sys.executable, os.path.join(ROOT, name), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", out.stdout))


def test_notebook_calls_every_script_with_accepted_flags():
    calls = notebook_calls()
    assert {name for name, _ in calls} == set(SCRIPTS)
    flags = {name: accepted_flags(name) for name in SCRIPTS}
    for name, argv in calls:
        used = {a for a in argv if a.startswith("--")}
        assert used <= flags[name], f"{name}: notebook uses unknown flags {used - flags[name]}"


def test_notebook_passes_the_notebook_validator_when_available():
    nbformat = pytest.importorskip("nbformat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cell without an id is a warning now, an error in later nbformat
        nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))
