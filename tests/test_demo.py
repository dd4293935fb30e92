"""demo.py end to end on a tiny model: every step runs, the report is written, a rerun skips finished steps."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

STEPS = 13  # locate, train_sv, five fine-tunes (control + four), six evaluations


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
    control_log = json.loads((out / "ft_control" / "train_log.json").read_text())
    assert control_log["data"].endswith("task_train.jsonl")  # the benign control sees no harmful row
    assert "wrote " not in table  # --compare's "wrote the plot" line stays out of the table
    assert table.strip() in report
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "safety_layers.png").stat().st_size > 1000
    for name in ("control", "lora", "sppft", "sv", "both"):
        assert (out / f"ft_{name}" / "adapter_model.safetensors").exists()
    assert "SPPFT" in result.stdout and f"[done] {STEPS}/{STEPS} evaluate both" in result.stdout
    assert f"report: {out / 'REPORT.md'}" in result.stdout


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
    os.remove(out / "eval" / "sv.json")
    result = run_demo("--quick", "--model", model, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[skip]") == STEPS - 1
    assert re.findall(r"^\[run \] (.+)$", result.stdout, flags=re.M) == [f"{STEPS - 1}/{STEPS} evaluate sv"]
    after = json.loads((out / "step_times.json").read_text())
    unchanged = {k: v for k, v in before.items() if k != "evaluate sv"}
    assert {k: v for k, v in after.items() if k != "evaluate sv"} == unchanged
    assert (out / "eval" / "sv.json").exists()
    assert "unknown" not in (out / "REPORT.md").read_text()

    # Outputs made without a time record (an older demo, or by hand) are reported as unknown, not as 0 s.
    os.remove(out / "step_times.json")
    result = run_demo("--quick", "--model", model, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = step_rows((out / "REPORT.md").read_text())
    assert len(rows) == STEPS and all(value.startswith("unknown") for _, value in rows)


def test_a_failing_step_stops_the_demo_and_names_it(tmp_path):
    result = run_demo("--quick", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert f"step '1/{STEPS} locate the safety layers' failed" in result.stderr
    assert not (tmp_path / "run" / "REPORT.md").exists()


def test_a_folder_from_other_settings_is_not_reused(demo_run):
    """A --quick folder must not pass for a full run: refused before any step starts, unless --force."""
    out, _, model = demo_run
    result = run_demo("--size", "cpu", "--model", model, "--out", str(out))
    assert result.returncode != 0
    assert "demo_settings.json records another run" in result.stderr and "--force" in result.stderr
    assert "[run ]" not in result.stdout and "[skip]" not in result.stdout
    assert json.loads((out / "demo_settings.json").read_text())["size"] == "quick"
