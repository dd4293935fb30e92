"""Copies tools/shared_block.py into every script between the shared-helper markers.

Run after editing the block: python tools/sync_shared_block.py
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("locate_layers.py", "train_sv.py", "finetune.py", "evaluate.py")
BEGIN = "# ---- shared helpers:"
END = "# ---- end of shared helpers ----"


def split_block(text):
    start = text.index(BEGIN)
    end = text.index(END) + len(END)
    return text[:start], text[start:end], text[end:]


def main():
    with open(os.path.join(ROOT, "tools", "shared_block.py")) as f:
        block = f.read().strip()
    for name in SCRIPTS:
        path = os.path.join(ROOT, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            text = f.read()
        head, _, tail = split_block(text)
        with open(path, "w") as f:
            f.write(head + block + tail)
        print(f"synced {name}")


if __name__ == "__main__":
    sys.exit(main())
