"""Runs every benchmark in bench/ and prints one table: figure, ours, baseline, ratio.

Each bench_<script>.py measures its baseline in the same run on the same machine.
    python bench/run_all.py            # full figures (about 6 minutes on an idle 2-core CPU)
    python bench/run_all.py --quick    # smaller sizes, same comparisons
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
import time

from table import print_table

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ("bench_locate_layers", "bench_train_sv", "bench_finetune", "bench_evaluate")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", nargs="*", default=None, help="run only these benches (e.g. bench_evaluate)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for name in BENCHES:
        if args.only and name not in args.only:
            continue
        start = time.time()
        print(f"== {name}", flush=True)
        for row in load(name).run(quick=args.quick):
            rows.append({"bench": name, **row})
        print(f"   ({time.time() - start:.0f} s)", flush=True)
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{platform.node()} · {device} · torch {torch.__version__}\n")
    print_table(rows, with_bench=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"\nrows written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
