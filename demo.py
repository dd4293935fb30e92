"""demo.py — the whole chain on one model, end to end, with a report.

    locate_layers.py -> train_sv.py -> finetune.py x5 (a benign control on the task rows alone, then
    plain LoRA, SPPFT, security vectors and both on the task rows mixed with harmful rows)
    -> evaluate.py on the base model and the five results -> evaluate.py --compare -> REPORT.md

The control separates what benign fine-tuning erodes by itself from what the harmful rows add.

Everything lands under --out (runs/demo). A step whose outputs are already there is skipped, so an
interrupted demo picks up where it stopped (a step cut off halfway is redone, replacing its leftovers);
--force reruns every step. Step times are kept in step_times.json, so the report of a resumed demo
still has them all. --size cpu runs SmolLM2-135M-Instruct (fast, barely aligned) on a 2-core CPU;
--quick is a smoke run.

    python demo.py
    python demo.py --model Qwen/Qwen2.5-1.5B-Instruct --load-in-4bit --size gpu
"""
import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time

from safeft import read_json_file, write_json_atomic, write_text_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))

# Step sizes. "cpu" fits SmolLM2-135M on a 2-core CPU; "gpu" is closer to the papers' settings;
# "quick" only proves the chain runs. model=None means --model (the scripts' default) is used.
SIZES = {
    "quick": dict(model="smollm2", ll=["--limit", "24", "--pairs", "100", "--search-radius", "1"],
                  sv=["--max-steps", "4"], ft=["--max-steps", "4"],
                  ev=["--limit", "8", "--max-new-tokens", "16", "--task-max-new-tokens", "16"]),
    # layer scale 1.2 is the paper's value for its three scale>1 models; "auto" would try several.
    "cpu": dict(model="smollm2", ll=["--limit", "100", "--scale", "1.2", "--search-radius", "2"],
                sv=["--max-steps", "20"], ft=["--max-steps", "12", "--lr", "5e-4"],
                ev=["--limit", "40", "--max-new-tokens", "64", "--task-max-new-tokens", "48"]),
    "gpu": dict(model=None, ll=[], sv=[], ft=[], ev=[]),
}
DATA = {"mixed": os.path.join(ROOT, "data", "mixed_train.jsonl"),  # task rows + ~9% harmful rows
        "task": os.path.join(ROOT, "data", "task_train.jsonl")}  # the same task rows alone
RUNS = (  # name, training data, extra finetune.py flags, what it shows
    ("control", "task", [], "plain LoRA on the task rows alone (benign fine-tuning control)"),
    ("lora", "mixed", [], "plain LoRA on the mixed data (the harmful fine-tuning attack)"),
    ("sppft", "mixed", ["--freeze-layers", "{safety_layers}"], "LoRA with the safety layers frozen (SPPFT)"),
    ("sv", "mixed", ["--security-vectors", "{security_vectors}"], "LoRA with the security vectors active"),
    ("both", "mixed", ["--freeze-layers", "{safety_layers}", "--security-vectors", "{security_vectors}"],
     "both defences"),
)


def script(name):
    return [sys.executable, os.path.join(ROOT, name)]


def shown(path):
    """A path as the user would type it: relative below the current folder, absolute elsewhere."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def run_step(key, title, outputs, command, force, times):
    """Runs one script unless every output already exists; exits on failure with the step named.
    times (key -> seconds) is kept in step_times.json so a report after a restart still has every step."""
    if not force and all(os.path.exists(p) for p in outputs):
        print(f"[skip] {title}: {', '.join(shown(p) for p in outputs)} already there", flush=True)
        times.setdefault(key, None)  # None: made outside this demo, time unknown
        return
    print(f"\n[run ] {title}\n       {' '.join(shown(c) if os.path.isabs(c) else c for c in command)}", flush=True)
    start = time.time()
    # A step runs only when its outputs are missing or incomplete (an interrupted run), and --out is the demo's
    # own folder, so what is there is the demo's leftover: replacing it is what a rerun should do.
    result = subprocess.run(command + ["--overwrite"], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"demo: step '{title}' failed (exit {result.returncode}); fix it and rerun: finished steps are kept")
    times[key] = round(time.time() - start, 1)
    print(f"[done] {title} in {times[key]:.0f} s", flush=True)


def load_json(path):
    return read_json_file(path, "demo")


def load_step_times(path):
    """Step times recorded by earlier invocations: a demo restarted after an interruption still reports them."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            times = json.load(f)
        except ValueError:
            return {}
    return times if isinstance(times, dict) else {}


def check_same_settings(path, settings, force):
    """Finished steps are reused only for the same model and sizes: a --size quick folder must not pass for
    a full run. Checked before any work starts."""
    if force or not os.path.exists(path):
        return
    try:
        before = load_json(path)
    except ValueError:
        before = None
    if before != settings:
        sys.exit(f"demo: {shown(path)} records another run ({json.dumps(before)}); pass --force to replace it, "
                 f"or choose another --out")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model for every step (default: smollm2 for --size cpu/quick, the scripts' default "
                             "model for --size gpu)")
    parser.add_argument("--load-in-4bit", action="store_true", help="4-bit base for training and evaluation")
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES), help="step sizes (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="same as --size quick")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/demo, or runs/demo-SIZE for another size)")
    parser.add_argument("--force", action="store_true", help="rerun every step, replacing its outputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "quick"
    size = SIZES[args.size]
    args.model = args.model or size["model"]
    out = os.path.abspath(args.out or os.path.join("runs", "demo" if args.size == "cpu" else f"demo-{args.size}"))
    settings = {"model": args.model, "size": args.size, "load_in_4bit": args.load_in_4bit}
    check_same_settings(os.path.join(out, "demo_settings.json"), settings, args.force)
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    write_json_atomic(os.path.join(out, "demo_settings.json"), settings)
    common = (["--model", args.model] if args.model else []) + (
        ["--load-in-4bit"] if args.load_in_4bit else ["--no-load-in-4bit"])
    paths = {"safety_layers": os.path.join(out, "safety_layers.json"),
             "security_vectors": os.path.join(out, "security_vectors")}
    started = time.time()
    times_path = os.path.join(out, "step_times.json")
    times = {} if args.force else load_step_times(times_path)

    number = itertools.count(1)
    steps = 2 + len(RUNS) + (1 + len(RUNS))  # locate, train_sv, the fine-tunes, evaluate base + each fine-tune

    def step(title, outputs, command):
        run_step(title, f"{next(number)}/{steps} {title}", outputs, command, args.force, times)
        write_json_atomic(times_path, times)

    step("locate the safety layers", [paths["safety_layers"]],
         script("locate_layers.py") + common + ["--out", paths["safety_layers"]] + size["ll"])
    step("train security vectors", [os.path.join(paths["security_vectors"], "sv_meta.json")],
         script("train_sv.py") + common + ["--out", paths["security_vectors"]] + size["sv"])
    for name, data, extra, what in RUNS:
        run_dir = os.path.join(out, f"ft_{name}")
        step(f"fine-tune {name}: {what}", [os.path.join(run_dir, "train_log.json")],
             script("finetune.py") + common + ["--data", DATA[data], "--out", run_dir]
             + [e.format(**paths) for e in extra] + size["ft"])
    evals = []
    for name, adapter in [("base", None)] + [(n, os.path.join(out, f"ft_{n}")) for n, *_ in RUNS]:
        eval_path = os.path.join(out, "eval", f"{name}.json")
        evals.append(eval_path)
        step(f"evaluate {name}", [eval_path, eval_path[:-5] + ".md"],
             script("evaluate.py") + common + ["--name", name, "--out", eval_path]
             + (["--adapter", adapter] if adapter else []) + size["ev"])

    compare_md = os.path.join(out, "comparison.md")
    compare_png = os.path.join(out, "comparison.png")
    table = subprocess.run(script("evaluate.py") + ["--compare"] + evals + ["--plot", compare_png, "--overwrite"],
                           cwd=ROOT, capture_output=True, text=True)
    if table.returncode != 0:
        sys.exit(f"demo: evaluate.py --compare failed: {table.stderr.strip().splitlines()[-1]}")
    # --compare also prints where it wrote the plot; only the table belongs in the report.
    table_text = "\n".join(line for line in table.stdout.splitlines() if not line.startswith("wrote ")) + "\n"
    write_text_atomic(compare_md, table_text)
    report = os.path.join(out, "REPORT.md")
    write_text_atomic(report, build_report(args, paths, table_text, times))
    print("\n" + table_text.strip())
    print(f"\ndemo finished: this invocation took {(time.time() - started) / 60:.1f} min")
    print(f"outputs in {shown(out)}/; report: {shown(report)}")


def build_report(args, paths, table, times):
    layers = load_json(paths["safety_layers"])
    sv = load_json(os.path.join(paths["security_vectors"], "sv_meta.json"))
    known = [t for t in times.values() if t is not None]
    total = f"{sum(known) / 60:.1f} minutes of step time" + ("" if len(known) == len(times) else
                                                            " (some steps' times are unknown, see below)")
    command = "python demo.py" + ("" if args.size == "cpu" else f" --size {args.size}")
    command += "" if args.model == SIZES[args.size]["model"] else f" --model {args.model}"
    command += " --load-in-4bit" if args.load_in_4bit else ""
    lines = [
        "# Demo report",
        "",
        f"Run on {datetime.date.today().isoformat()} on {platform.node()} ({os.cpu_count()} CPU cores), "
        f"model `{args.model or 'default'}`, size `{args.size}`, {total}. Command: `{command}`.",
        "",
        "## Results",
        "",
        table.strip(),
        "",
        "![harmful rate, over-refusal and accuracy per run](comparison.png)",
        "",
        "## Safety layers",
        "",
        describe_layers(layers),
        "",
        f"![cosine curves and scaling sweeps]({os.path.basename(paths['safety_layers'])[:-5]}.png)",
        "",
        "## Security vectors",
        "",
        describe_sv(sv),
        "",
        "## Step times",
        "",
        "| step | seconds |",
        "|---|---|",
    ] + [f"| {k} | {'unknown (outputs were already there)' if v is None else f'{v:.0f}'} |" for k, v in times.items()]
    return "\n".join(lines) + "\n"


def describe_layers(layers):
    found = layers["safety_layers"]
    text = (f"Safety layers: **{found['start']}-{found['end']}** (0-based, inclusive) of {layers['num_layers']}; "
            f"initial range from the cosine analysis {layers['initial_range']['start']}-"
            f"{layers['initial_range']['end']}.")
    if layers.get("fallback"):
        text += f" This is a **fallback**, not a detected range: {layers.get('fallback_reason', '').rstrip('.')}."
    gap = layers["cosine"]["gap_deg"]
    text += f" The N-M angle gap peaks at {max(gap):.2f} degrees (layer {gap.index(max(gap))})."
    return text


def describe_sv(sv):
    check = sv.get("check", {})
    final_loss = sv.get("final_loss", float("nan"))
    text = f"Trained for {len(sv.get('losses', []))} steps, final training loss {final_loss:.3f}."
    if "heldout_loss_active" in check:
        # Security vectors work by making the harmful responses already likely while they are on, so the
        # fine-tune has little loss left to learn them from; a clear active < inactive gap is the sign.
        text += (f" On {check.get('heldout_loss_rows')} held-out harmful examples the response loss is "
                 f"{check['heldout_loss_active']:.3f} with the vectors on and {check['heldout_loss_inactive']:.3f} "
                 f"with them off.")
    if "refusals_with_vectors" in check:
        text += (f" Greedy answers to {check.get('prompts')} harmful prompts: {check['refusals_with_vectors']} "
                 f"refusals with the vectors on, {check['refusals_without_vectors']} with them off.")
    return text


if __name__ == "__main__":
    main()
