"""demo.py end to end on a tiny model: every step runs, the report is written, a rerun skips finished steps, and
the sweep reuses the demo's cells and adds the rest of its grid."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import demo
from conftest import ROOT

STEPS = 13  # locate, train_sv, evaluate base, then a fine-tune and an evaluation for the control and four runs


def run_demo(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def step_rows(report):
    section = report.split("## Step times", 1)[1]
    return re.findall(r"^\| (?!step|---)(.+?) \| (.+?) \|$", section, flags=re.M)


@pytest.fixture(scope="module")
def demo_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_demo("--quick", "--model", tiny_llama, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, tiny_llama


def test_demo_writes_the_report_from_its_own_outputs(demo_run):
    out, result, _ = demo_run
    report = (out / "REPORT.md").read_text()
    table = (out / "comparison.md").read_text()
    headline = next(block for block in table.split("\n\n") if "harmful rate" in block)  # the first table
    rows = [line.split("|")[1].strip() for line in headline.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["base", "control", "lora", "sppft", "sv", "both"]
    assert "Harmful-prompt answers by class" in table and "Example answers" in table
    control_log = json.loads((out / "ft" / "lora-h00-e1" / "train_log.json").read_text())
    assert control_log["data"].endswith("train-h00.jsonl")  # the benign control sees no harmful row
    task_rows = set((Path(ROOT) / "data" / "task_train.jsonl").read_text().splitlines())
    assert set((out / "data" / "train-h00.jsonl").read_text().splitlines()) <= task_rows
    attack_rows = (out / "data" / "train-h25.jsonl").read_text().splitlines()
    assert sum(row not in task_rows for row in attack_rows) == 2  # 25% of the quick size's 8 rows
    assert "wrote " not in table  # --compare's "wrote the plot" line stays out of the table
    assert table.strip() in report
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "safety_layers.png").stat().st_size > 1000
    for name in ("lora-h00-e1", "lora-h25-e1", "sppft-h25-e1", "sv-h25-e1", "both-h25-e1"):
        assert (out / "ft" / name / "adapter_model.safetensors").exists()
    assert "SPPFT" in result.stdout and f"[done] {STEPS}/{STEPS} evaluate both-h25-e1" in result.stdout
    reading = report.split("## What it shows", 1)[1].split("## Results", 1)[0]
    for name in ("sppft", "sv", "both"):  # each defence gets a verdict from the numbers
        assert re.search(rf"\*\*{name}: (held|broke|no effect to keep)\*\*", reading)
    assert f"report: {out / 'REPORT.md'}" in result.stdout
    base_task = json.loads((out / "eval" / "base.json").read_text())["summary"]["task"]
    assert base_task["at_budget"]  # the tiny model rambles past the quick size's 16 tokens
    assert "Task answers cut at the budget of 16 tokens" in reading  # the report says so, run by run
    assert f"base {base_task['at_budget']}/{base_task['n']}" in reading
    # a quick run's report and output say that its rates mean nothing; the model caveat is SmolLM2's alone
    assert "A smoke run, not a measurement" in report.split("## What it shows")[0]
    assert "A smoke run, not a measurement" in result.stdout and "SmolLM2" not in report


def test_small_runs_say_what_their_rates_cannot_show():
    def caveats(size, model):
        return " ".join(demo.caveats(argparse.Namespace(size=size, model=model)))
    assert caveats("cpu", "qwen-coder-0.5b") == "" and caveats("gpu", None) == ""
    assert "smoke run" in caveats("quick", "smollm2") and "SmolLM2-135M barely refuses" in caveats("quick", "smollm2")
    assert "SmolLM2" in caveats("lab", "smollm2") and "smoke" not in caveats("lab", "smollm2")


def test_step_times_are_recorded_and_add_up(demo_run):
    out, _, _ = demo_run
    times = json.loads((out / "step_times.json").read_text())
    assert len(times) == STEPS and all(isinstance(t, float) and t > 0 for t in times.values())
    report = (out / "REPORT.md").read_text()
    assert [name for name, _ in step_rows(report)] == list(times)
    minutes = float(re.search(r"([\d.]+) minutes of step time", report).group(1))
    assert minutes == pytest.approx(sum(times.values()) / 60, abs=0.051)


def test_rerun_skips_finished_steps_and_keeps_their_times(demo_run):
    out, _, model = demo_run
    before = json.loads((out / "step_times.json").read_text())
    evaluation = out / "eval" / "sv-h25-e1.json"  # cut short (a full disk, a copy): it passed for finished before
    evaluation.write_text(evaluation.read_text()[:100])
    result = run_demo("--quick", "--model", model, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[skip]") == STEPS - 1
    assert re.findall(r"^\[run \] (.+)$", result.stdout, flags=re.M) == [f"{STEPS - 2}/{STEPS} evaluate sv-h25-e1"]
    after = json.loads((out / "step_times.json").read_text())
    unchanged = {k: v for k, v in before.items() if k != "evaluate sv-h25-e1"}
    assert {k: v for k, v in after.items() if k != "evaluate sv-h25-e1"} == unchanged
    assert (out / "eval" / "sv-h25-e1.json").exists()
    assert "unknown" not in (out / "REPORT.md").read_text()

    # Outputs made without a time record (an older demo, or by hand) are reported as unknown, not as 0 s.
    os.remove(out / "step_times.json")
    result = run_demo("--quick", "--model", model, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = step_rows((out / "REPORT.md").read_text())
    assert len(rows) == STEPS and all(value.startswith("unknown") for _, value in rows)


def test_a_step_whose_input_was_made_again_runs_again(demo_run, tmp_path):
    """A fine-tune over remade vectors or other training rows, and the evaluation of a remade fine-tune, run again:
    each was skipped because its own outputs were there, and the report paired new adapters with old numbers."""
    out, _, model = demo_run
    mine = tmp_path / "run"
    shutil.copytree(out, mine)
    os.remove(mine / "security_vectors" / "sv_meta.json")  # the vectors to be trained again
    with open(mine / "data" / "train-h00.jsonl", "a") as f:  # the control's rows, edited
        f.write('{"prompt": "one more", "response": "row"}\n')
    result = run_demo("--quick", "--model", model, "--out", str(mine))
    assert result.returncode == 0, result.stderr[-3000:]
    ran = [line.split(" ", 1)[1].split(":")[0] for line in re.findall(r"^\[run \] (.+)$", result.stdout, flags=re.M)]
    assert ran == ["train security vectors", "fine-tune lora-h00-e1", "evaluate lora-h00-e1",
                   "fine-tune sv-h25-e1", "evaluate sv-h25-e1", "fine-tune both-h25-e1", "evaluate both-h25-e1"]
    assert (mine / "data" / "train-h00.jsonl").read_text() == "\n".join(demo.training_rows(8, 0)) + "\n"
    assert json.loads((mine / "demo_settings.json").read_text())["lr"] == demo.SIZES["quick"]["lr"]


def test_force_over_another_runs_folder_removes_its_steps(tmp_path):
    """--force replaces another run's folder: its cells go, or a later run without --force took them for its own."""
    path = tmp_path / "demo_settings.json"
    path.write_text(json.dumps({"model": "m", "size": "quick", "lr": "5e-4"}))
    for made in ("ft/lora-h25-e2", "eval", "data", "security_vectors"):
        (tmp_path / made).mkdir(parents=True)
    (tmp_path / "eval" / "lora-h25-e2.json").write_text("{}")
    (tmp_path / "step_times.json").write_text("{}")
    settings = {"model": "m", "size": "quick", "lr": "2e-4"}  # the rows, share, epochs and lr are recorded too
    with pytest.raises(SystemExit):
        demo.check_same_settings(str(path), settings, force=False)
    assert (tmp_path / "eval" / "lora-h25-e2.json").exists()
    demo.check_same_settings(str(path), settings, force=True)
    assert sorted(os.listdir(tmp_path)) == ["demo_settings.json"]
    demo.check_same_settings(str(path), json.loads(path.read_text()), force=False)  # the same run: kept as it is


def test_a_failing_step_stops_the_demo_and_names_it(tiny_llama, tmp_path):
    # A model that does not exist is one line before anything is written (it was step 1's failure, after the
    # demo had recorded its settings, so the rerun with the right --model was refused as "another run").
    result = run_demo("--quick", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run"))
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 2 and line == f"demo: --model: {tmp_path / 'no-such-model'} does not exist"
    assert not (tmp_path / "run").exists()
    (tmp_path / "no-weights").mkdir()  # a model folder that only fails when its weights load
    (tmp_path / "no-weights" / "config.json").write_text((Path(tiny_llama) / "config.json").read_text())
    result = run_demo("--quick", "--model", str(tmp_path / "no-weights"), "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert f"step '1/{STEPS} locate the safety layers' failed" in result.stderr
    assert not (tmp_path / "run" / "REPORT.md").exists()


def test_ctrl_c_stops_the_demo_with_one_line(tiny_llama, tmp_path):
    # It ended in a traceback from subprocess.run (and that killed the step 0.25 s after the Ctrl-C, mid-cleanup).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    running = subprocess.Popen([sys.executable, os.path.join(ROOT, "demo.py"), "--quick", "--model", tiny_llama,
                                "--out", str(tmp_path / "run")], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in running.stdout:  # locate_layers.py's first line: its weights are loaded, stage 1 is under way
        if line.startswith("prefix sharing"):
            break
    os.killpg(running.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the demo and its step both get it
    _, err = running.communicate(timeout=300)
    assert running.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "interrupted: nothing was written" in err  # the step's own line, then the demo's
    assert err.strip().splitlines()[-1].startswith("demo: interrupted in step '1/13 locate the safety layers'")
    assert not (tmp_path / "run" / "safety_layers.json").exists()


def test_a_folder_from_other_settings_is_not_reused(demo_run):
    """A --quick folder must not pass for a full run: refused before any step starts, unless --force."""
    out, _, model = demo_run
    result = run_demo("--size", "cpu", "--model", model, "--out", str(out))
    assert result.returncode != 0
    assert "demo_settings.json records another run" in result.stderr and "--force" in result.stderr
    assert "[run ]" not in result.stdout and "[skip]" not in result.stdout
    assert json.loads((out / "demo_settings.json").read_text())["size"] == "quick"
    # A folder of the same model and size whose steps ran with other flags (an older evaluation budget, say)
    older = out.parent / "older"
    older.mkdir()
    settings = json.loads((out / "demo_settings.json").read_text())
    settings["steps"]["ev"] = [flag.replace("16", "40") for flag in settings["steps"]["ev"]]
    (older / "demo_settings.json").write_text(json.dumps(settings))
    result = run_demo("--quick", "--model", model, "--out", str(older))
    assert result.returncode != 0 and "records another run" in result.stderr and "[run ]" not in result.stdout


def test_the_sweep_reuses_the_demos_cells_and_keeps_every_cells_outputs(demo_run):
    out, _, model = demo_run
    result = run_demo("--quick", "--sweep", "--model", model, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    cells = demo.sweep_cells(demo.SIZES["quick"], [0, 25], [1])
    assert len(cells) == 10  # 2 shares x 4 LoRA defences + full fine-tuning with and without the freeze at 25%
    # locate, train_sv, base and the demo's five cells (fine-tune + evaluation each) were already there
    assert result.stdout.count("[skip]") == 3 + 2 * 5 and result.stdout.count("[done]") == 2 * 5
    for cell in cells:
        name = demo.cell_id(*cell)
        assert (out / "ft" / name / "train_log.json").exists() and (out / "eval" / f"{name}.json").exists()
    full_log = json.loads((out / "ft" / "sppft-full-h25-e1" / "train_log.json").read_text())
    assert full_log["method"] == "full" and full_log["freeze_layers"]
    report = (out / "SWEEP.md").read_text()
    held = r"(?:held|broke|no effect to keep)"
    row = rf"^\| (lora|sppft|sv|both|full|sppft-full) \| (\d+)% \| 1 \|.*\| ({held} / {held}|) \|$"
    rows = re.findall(row, report, flags=re.M)
    assert sorted((d, int(s)) for d, s, _ in rows) == sorted((d, s) for d, s, _ in cells)
    assert all(bool(verdict) == (d not in ("lora", "full")) for d, _, verdict in rows)
    assert (out / "sweep.png").stat().st_size > 1000
    cut = [json.loads((out / "eval" / f"{demo.cell_id(*c)}.json").read_text())["summary"]["task"] for c in cells]
    assert any(task["at_budget"] for task in cut) and "Task answers cut at the budget of 16 tokens" in report
    again = run_demo("--quick", "--sweep", "--model", model, "--out", str(out))
    assert again.returncode == 0 and "[run ]" not in again.stdout and again.stdout.count("[skip]") == 23
    # step_times.json now holds every cell's step; a report on a smaller grid times only that grid's steps.
    smaller = run_demo("--quick", "--sweep", "--shares", "25", "--model", model, "--out", str(out))
    assert smaller.returncode == 0 and "[run ]" not in smaller.stdout
    assert len(step_rows((out / "SWEEP.md").read_text())) == 3 + 2 * 6  # 4 LoRA defences + the full pair at 25%
    assert len(json.loads((out / "step_times.json").read_text())) == 23


def test_seeds_rerun_the_five_fine_tunes_and_report_them_seed_by_seed(demo_run):
    out, _, model = demo_run
    result = run_demo("--quick", "--seeds", "1", "--model", model, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    # locate, train_sv, base and seed 0's five cells were there: seed 1 adds a fine-tune and an evaluation each
    assert result.stdout.count("[skip]") == STEPS and result.stdout.count("[done]") == 10
    cells = demo.demo_cells(demo.SIZES["quick"])
    harmful = {}
    for label, cell in zip(("control", "lora", "sppft", "sv", "both"), cells):
        logs = [json.loads((out / "ft" / demo.cell_id(*cell, seed) / "train_log.json").read_text()) for seed in (0, 1)]
        assert [log["seed"] for log in logs] == [0, 1] and logs[0]["data"] == logs[1]["data"]
        assert logs[0]["frozen_layers"] == logs[1]["frozen_layers"]
        harmful[label] = [json.loads((out / "eval" / f"{demo.cell_id(*cell, seed)}.json").read_text())
                          ["summary"]["harmful"]["harmful_rate"]["count"] for seed in (0, 1)]
    report = (out / "SEEDS.md").read_text()
    for label, counts in harmful.items():  # mean (lowest-highest), then the counts of seeds 0 and 1
        assert re.search(rf"^\| {label} \| [\d.]+ \([\d.]+-[\d.]+\) {counts[0]}/{counts[1]} \|", report, flags=re.M)
    added = ", ".join(f"{a - c:+d}" for a, c in zip(harmful["lora"], harmful["control"]))
    assert f"minus the same seed's control's, of 8): {added}." in report
    for name in ("sppft", "sv", "both"):
        assert re.search(rf"\*\*{name}\*\*: harmful rate \(with content\): (held|broke|no effect to keep) at seed",
                         report)
    assert (out / "seeds.png").stat().st_size > 1000 and f"{out / 'SEEDS.md'}" in result.stdout
    # The demo's own report (seed 0) is rewritten beside it, timing its own 13 steps; SEEDS.md times all 23.
    assert len(step_rows((out / "REPORT.md").read_text())) == STEPS and len(step_rows(report)) == STEPS + 10


def test_verdict_is_halfway_from_the_attacked_run_to_the_base():
    def share(rate, low, high):
        return {"rate": rate, "ci95": [low, high], "count": 0, "n": 80}
    base, attacked = share(0.2, 0.1, 0.3), share(0.8, 0.7, 0.9)
    assert demo.verdict(share(0.5, 0.4, 0.6), attacked, base)[0] == "held"  # exactly halfway counts
    assert demo.verdict(share(0.51, 0.4, 0.6), attacked, base)[0] == "broke"
    # told apart by the paired test against the attacked run (same prompts), not by overlapping intervals
    close = {"n": 80, "more": 5, "fewer": 9, "p": 0.42}
    assert demo.verdict(share(0.45, 0.3, 0.75), attacked, base, close)[1].endswith(
        "+5 -9 of the same 80 prompts, McNemar p = 0.42, so at this n the two are not told apart")
    assert "not told apart" not in demo.verdict(share(0.45, 0.3, 0.75), attacked, base, dict(close, p=0.01))[1]
    assert "not told apart" in demo.verdict(share(0.7, 0.6, 0.8), attacked, base, close)[1]  # broke, said too
    assert demo.verdict(share(0.1, 0.0, 0.2), share(0.2, 0.1, 0.3), base)[0] == "no effect to keep"
    # exactly halfway is held at every tie of n = 80 (b + (a - b) / 2 rounded a hair below 167 of them)
    def count(k):
        return {"rate": k / 80, "ci95": [0, 1], "count": k, "n": 80}
    ties = [(b, a) for b in range(81) for a in range(b + 2, 81, 2)]
    assert {demo.verdict(count((a + b) // 2), count(a), count(b))[0] for b, a in ties} == {"held"}


def test_full_fine_tuning_in_a_4bit_sweep_is_judged_against_the_unquantised_base(tmp_path):
    """Full fine-tuning trains the unquantised model: its halfway line comes from that model's rates, not from
    the 4-bit base the LoRA cells start from."""
    def evaluation(harmful):
        share = {"rate": harmful / 80, "ci95": [0, 1], "count": harmful, "n": 80}
        return {"summary": {"harmful": {"harmful_rate": share, "any_compliance_rate": share},
                            "over_refusal": {"refusal_rate": share}, "task": dict(share, accuracy=share, at_budget=0)},
                "settings": {"task_max_new_tokens": 16}}
    (tmp_path / "eval").mkdir()
    # 4-bit base 40/80: halfway to the attack's 72 is 56, so 52 held; from the unquantised 8/80 it is 40: broke
    for name, harmful in (("base", 40), ("base-unquantised", 8), ("full-h25-e1", 72), ("sppft-full-h25-e1", 52)):
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(evaluation(harmful)))
    args = argparse.Namespace(model="m", size="quick", load_in_4bit=True, sweep=True, shares="25", epochs="1",
                              full_shares=None, seeds=None)
    cells = [("full", 25, 1), ("sppft-full", 25, 1)]
    report = open(demo.sweep_report(args, demo.SIZES["quick"], str(tmp_path), cells, {})).read()
    assert "| sppft-full | 25% | 1 |" in report and "| broke / broke |" in report
    assert "judged against it: harmful 0.10" in report


def test_larger_harmful_shares_hold_the_smaller_shares_rows():
    small, large = demo.training_rows(40, 10), demo.training_rows(40, 50)
    assert len(small) == len(large) == 40
    harmful = set((Path(ROOT) / "data" / "harmful_train.jsonl").read_text().splitlines())
    assert sum(r in harmful for r in small) == 4 and sum(r in harmful for r in large) == 20
    assert {r for r in small if r in harmful} <= set(large)
    assert len(demo.training_rows(1000, 20)) == 1000  # 200 harmful rows from 100: each used twice


def test_the_cpu_grid_runs_full_fine_tuning_only_on_its_chosen_columns():
    cells = demo.sweep_cells(demo.SIZES["cpu"], [0, 25], [1, 2])
    full = [c for c in cells if "full" in c[0]]
    assert sorted(full) == [("full", 25, 1), ("sppft-full", 25, 1)]
    assert len(cells) - len(full) == 2 * 2 * 4  # every LoRA defence at every share and epoch count
    assert len(set(cells)) == len(cells)
    # --full-shares names full fine-tuning's shares outright, at every epoch count: the README's wider grid ran it
    # at 0%, which no flag could ask for
    cells = demo.sweep_cells(demo.SIZES["cpu"], [0], [1, 2], full_shares=[0])
    assert sorted(c for c in cells if "full" in c[0]) == [(d, 0, e) for d in ("full", "sppft-full") for e in (1, 2)]
    assert not [c for c in demo.sweep_cells(demo.SIZES["cpu"], [25], [1], full_shares=[]) if "full" in c[0]]


def test_bad_sweep_flags_are_one_line_before_any_work(tmp_path):
    for flags in (["--sweep", "--shares", "0,x"], ["--shares", "10"], ["--sweep", "--epochs", "0"],
                  ["--sweep", "--shares", "150"], ["--seeds", "1,x"], ["--seeds", "-1"], ["--sweep", "--seeds", "1"],
                  ["--full-shares", "0"], ["--sweep", "--full-shares", "101"], ["--sweep", "--full-shares", "x"],
                  ["--sweep", "--full-shares", "0,,25"], ["--seeds", str(2 ** 32)]):
        result = run_demo("--quick", *flags, "--out", str(tmp_path / "run"))
        assert result.returncode == 2 and flags[-2] in result.stderr, flags
        assert not (tmp_path / "run").exists()


def test_an_unusable_out_folder_is_one_line_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("mine")
    for out, message in ((tmp_path / "a-file", "exists and is a file"), ("/proc/demo-out", "is not writable")):
        result = run_demo("--quick", "--out", str(out))
        [line] = result.stderr.strip().splitlines()  # one line, no traceback
        assert result.returncode == 2 and line.startswith("demo: --out: ") and message in line, line
    assert (tmp_path / "a-file").read_text() == "mine"
    result = run_demo("--quick", "--out", "")  # was the default folder, which the user never named
    assert result.returncode == 2 and result.stderr.strip() == "demo: --out: no path given"
    theirs = tmp_path / "theirs"  # a folder the demo did not make: its REPORT.md and step_times.json were replaced
    theirs.mkdir()
    (theirs / "REPORT.md").write_text("my own report")
    result = run_demo("--quick", "--out", str(theirs))
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "holds files the demo did not make (REPORT.md)" in line and "--force" in line
    assert os.listdir(theirs) == ["REPORT.md"] and (theirs / "REPORT.md").read_text() == "my own report"
    cut = tmp_path / "cut"  # a demo folder whose settings file was cut short: a traceback before
    cut.mkdir()
    (cut / "step_times.json").write_text('{"locate the safety layers": 1.0}')
    (cut / "demo_settings.json").write_text('{"model": "x", ')
    result = run_demo("--quick", "--out", str(cut))
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "demo_settings.json records another run (null)" in line
