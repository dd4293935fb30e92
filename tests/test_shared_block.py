"""The helper block is repeated verbatim in every script (they are standalone); this keeps the copies equal."""
import ast
import os

from conftest import ROOT

SCRIPTS = ("locate_layers.py", "train_sv.py", "finetune.py", "evaluate.py")
BEGIN = "# ---- shared helpers:"
END = "# ---- end of shared helpers ----"


def block_of(text):
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    return text[text.index(BEGIN):text.index(END) + len(END)]


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_every_script_carries_the_same_block():
    canonical = block_of(read(os.path.join("tools", "shared_block.py")))
    for name in SCRIPTS:
        assert block_of(read(name)) == canonical, f"{name}: shared block differs; run tools/sync_shared_block.py"


def test_scripts_import_no_repo_module():
    # Standalone means a user can paste one file into a notebook: no import of another file of ours.
    ours = {os.path.splitext(n)[0] for n in os.listdir(ROOT) if n.endswith(".py")} | {"tools", "tests", "bench", "data"}
    for name in SCRIPTS:
        tree = ast.parse(read(name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not set(names) & ours, f"{name} imports {names}"


def test_scripts_have_guarded_main_taking_argv():
    for name in SCRIPTS:
        tree = ast.parse(read(name))
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert mains and mains[0].args.args[0].arg == "argv", name
        assert 'if __name__ == "__main__":' in read(name), name
