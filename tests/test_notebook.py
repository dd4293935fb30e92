"""The quickstart notebook is valid nbformat-4 JSON, and every script call in it and in the docs (README, docs/,
the scripts' own docstrings) uses flags the scripts accept."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import pytest

import safeft
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


def code_lines():
    with open(NOTEBOOK) as f:
        cells = json.load(f)["cells"]
    return [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]


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


def test_notebook_shell_lines_survive_ipython_expansion():
    """IPython evaluates {...} in a ! line as Python and puts a notebook variable in for $NAME: a shell brace list
    (part{1,2}) became 'part(1, 2)', a syntax error that stopped the whole install line."""
    lines = code_lines()
    defined = {m.group(1) for line in lines if (m := re.match(r"([A-Za-z_]\w*)\s*=", line))}
    for line in (line.strip() for line in lines if line.strip().startswith("!")):
        assert "{" not in line and "}" not in line, f"IPython would evaluate the braces in: {line}"
        assert set(re.findall(r"\$(\w+)", line)) <= defined, f"undefined $ variable in: {line}"


def test_notebook_installs_the_embedded_aligned_model():
    """The install line names every part the module needs for --model qwen-coder-0.5b, at the pinned version."""
    wanted = {word for word in safeft.EMBEDDED_MODELS["qwen-coder-0.5b"]["install"].split() if "==" in word}
    assert len(wanted) == 6
    assert any(wanted <= set(line.split()) for line in code_lines() if line.strip().startswith("!pip"))


def test_documented_commands_use_flags_the_scripts_accept():
    """A renamed flag must not live on in a command a reader copies from the README, docs/ or a docstring."""
    scripts = SCRIPTS + ("demo.py",)
    flags = {name: accepted_flags(name) for name in scripts}
    files = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True),
             *(os.path.join(ROOT, name) for name in scripts)]
    pattern = re.compile(r"(?:python|torchrun)[^\n`|]*?\b(" + "|".join(re.escape(n) for n in scripts) + r")([^\n`|]*)")
    checked = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            for name, rest in pattern.findall(f.read()):
                used = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", rest))
                assert used <= flags[name], f"{os.path.relpath(path, ROOT)}: {name} {sorted(used - flags[name])}"
                checked += 1
    assert checked >= 30  # the pattern still finds the commands


def test_notebook_separates_benign_erosion_from_the_harmful_rows():
    """Benign fine-tuning alone erodes a small aligned model's refusals (README): without a control trained on the
    task rows alone, a reader would credit the harmful rows with all the damage. The control must be fine-tuned on
    the task data only, evaluated, and in the comparison."""
    calls = notebook_calls()
    outs = {}
    for name, argv in calls:
        if name == "finetune.py":
            outs[argv[argv.index("--out") + 1]] = argv[argv.index("--data") + 1] if "--data" in argv else None
    controls = [out for out, data in outs.items() if data == "data/task_train.jsonl"]
    assert controls, "no fine-tune on the task rows alone"
    assert any(data == "data/mixed_train.jsonl" for data in outs.values())
    evaluated = {argv[argv.index("--adapter") + 1]: argv[argv.index("--out") + 1]
                 for name, argv in calls if name == "evaluate.py" and "--adapter" in argv}
    assert controls[0] in evaluated
    compared = [argv for name, argv in calls if name == "evaluate.py" and "--compare" in argv]
    assert compared and evaluated[controls[0]] in compared[0]
    def prompts(name, source=None):
        with open(os.path.join(ROOT, "data", name), encoding="utf-8") as f:
            return {row["prompt"] for row in map(json.loads, f) if source in (None, row.get("source"))}
    # the control's rows are the attack's task rows, none of its harmful ones
    assert prompts("task_train.jsonl") == prompts("mixed_train.jsonl", "task")


@pytest.mark.parametrize("script", SCRIPTS)
def test_errors_name_the_script_when_main_runs_in_a_notebook(script, monkeypatch, capsys):
    # In a kernel sys.argv[0] is the kernel's launcher; argparse took its name for the script's
    import importlib
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--no-such-flag"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"{script}: error: unrecognized arguments")
