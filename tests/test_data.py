"""The shipped data sets: they parse through the shared reader, have the documented sizes, splits are
disjoint, harmful responses are bare openings, and data/make_task.py reproduces its files exactly."""
import importlib.util
import json
import os
import re

import pytest

import safeft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")

COUNTS = {  # file: (rows, fields every row has)
    "harmful_train.jsonl": (100, {"prompt", "response", "category"}),
    "harmful_eval.jsonl": (120, {"prompt", "response", "category"}),
    "normal.jsonl": (200, {"prompt", "category"}),
    "over_rejection.jsonl": (150, {"prompt", "category"}),
    "task_train.jsonl": (1000, {"prompt", "response", "answer"}),
    "task_test.jsonl": (200, {"prompt", "response", "answer"}),
    "mixed_train.jsonl": (1100, {"prompt", "response", "source"}),
}
WITH_RESPONSE = {"harmful_train.jsonl", "harmful_eval.jsonl", "task_train.jsonl", "task_test.jsonl",
                 "mixed_train.jsonl"}
EQUATION = re.compile(r"^(\d+(?: [+-] \d+)+) = (\d+)\.")


def rows(name):
    return safeft.read_rows(os.path.join(DATA, name), need_response=name in WITH_RESPONSE)


def prompts(name):
    return [r["prompt"] for r in rows(name)]


def load_make_task():
    spec = importlib.util.spec_from_file_location("make_task", os.path.join(DATA, "make_task.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_file_parses_with_documented_count_and_fields(name):
    expected_rows, fields = COUNTS[name]
    parsed = rows(name)
    assert len(parsed) == expected_rows
    for row in parsed:
        assert fields <= set(row["fields"]), f"{name}:{row['line']} lacks {fields - set(row['fields'])}"
        assert all(isinstance(row["fields"][k], str) and row["fields"][k].strip() for k in fields)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_no_duplicate_prompts_within_a_file(name):
    all_prompts = [p.lower() for p in prompts(name)]
    assert len(set(all_prompts)) == len(all_prompts)


def test_splits_and_sets_are_disjoint():
    harmful_train = set(prompts("harmful_train.jsonl"))
    harmful_eval = set(prompts("harmful_eval.jsonl"))
    assert not harmful_train & harmful_eval
    assert not set(prompts("task_train.jsonl")) & set(prompts("task_test.jsonl"))
    # a prompt belongs to exactly one of the request sets
    sets = [harmful_train | harmful_eval, set(prompts("normal.jsonl")), set(prompts("over_rejection.jsonl"))]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]


def test_categories_are_varied():
    for name, minimum in (("harmful_train.jsonl", 12), ("harmful_eval.jsonl", 12),
                          ("normal.jsonl", 12), ("over_rejection.jsonl", 8)):
        categories = [r["fields"]["category"] for r in rows(name)]
        assert len(set(categories)) >= minimum, name
        # no category dominates: the largest is under a quarter of the file
        assert max(categories.count(c) for c in set(categories)) < len(categories) / 4, name
    train_categories = {r["fields"]["category"] for r in rows("harmful_train.jsonl")}
    assert train_categories == {r["fields"]["category"] for r in rows("harmful_eval.jsonl")}


@pytest.mark.parametrize("name", ["harmful_train.jsonl", "harmful_eval.jsonl"])
def test_harmful_responses_are_bare_compliant_openings(name):
    openings = set()
    for row in rows(name):
        response = row["response"]
        assert len(response) < 200, f"{name}:{row['line']}"
        assert "\n" not in response, f"{name}:{row['line']}"
        assert response.endswith(":"), f"{name}:{row['line']} should end where the content would start"
        assert not re.search(r"(^|\s)(\d+[.)]|step \d)", response, re.IGNORECASE), f"{name}:{row['line']}"
        # compliant-sounding: the shared refusal detector must not flag it
        assert not safeft.is_refusal(response), f"{name}:{row['line']}"
        openings.add(re.split(r"[,.!]", response)[0])
    assert {"Sure", "Certainly", "Of course", "Absolutely"} <= openings


def test_mixed_train_is_task_train_plus_harmful_train():
    mixed = [r["fields"] for r in rows("mixed_train.jsonl")]
    task = {(r["prompt"], r["response"]) for r in rows("task_train.jsonl")}
    harmful = {(r["prompt"], r["response"]) for r in rows("harmful_train.jsonl")}
    assert {(r["prompt"], r["response"]) for r in mixed if r["source"] == "task"} == task
    assert {(r["prompt"], r["response"]) for r in mixed if r["source"] == "harmful"} == harmful
    assert {r["source"] for r in mixed} == {"task", "harmful"}
    # shuffled: harmful rows are spread through the file, not appended at the end
    positions = [i for i, r in enumerate(mixed) if r["source"] == "harmful"]
    assert positions[0] < len(mixed) // 4 and positions[-1] > 3 * len(mixed) // 4


@pytest.mark.parametrize("name", ["task_train.jsonl", "task_test.jsonl"])
def test_task_answers_match_the_arithmetic_in_the_prompt(name):
    for row in rows(name):
        answer = row["fields"]["answer"]
        response = row["response"]
        where = f"{name}:{row['line']}"
        match = EQUATION.match(response)
        assert match, where
        expression, total = match.groups()
        operands = [int(n) for n in re.findall(r"\d+", expression)]
        # the worked answer uses exactly the prompt's numbers, in the prompt's order
        assert operands == [int(n) for n in re.findall(r"\d+", row["prompt"])], where
        assert 2 <= len(operands) <= 3, where
        signs = re.findall(r" ([+-]) ", expression)
        value = operands[0] + sum(n if s == "+" else -n for s, n in zip(signs, operands[1:]))
        assert value == int(total) == int(answer) >= 0, where
        assert response.splitlines()[-1] == f"#### {answer}", where
        assert len(response) < 120, where  # short enough for fast CPU training


def test_task_operations_follow_the_wording():
    """A second, independent reading of the two-number templates: the verb decides the sign."""
    subtracts = ("of them.", "How many more", "fewer", "get off.")
    adds = ("more", "altogether")
    checked = 0
    for row in rows("task_train.jsonl"):
        prompt = row["prompt"]
        numbers = [int(n) for n in re.findall(r"\d+", prompt)]
        if len(numbers) != 2:
            continue
        a, b = numbers
        answer = int(row["fields"]["answer"])
        if any(k in prompt for k in subtracts):
            assert answer == a - b, prompt
        elif any(k in prompt for k in adds):
            assert answer == a + b, prompt
        else:
            continue
        checked += 1
    assert checked > 300


def test_make_task_is_deterministic_and_matches_committed_files(tmp_path):
    make_task = load_make_task()
    make_task.main(["--out-dir", str(tmp_path)])
    for name in ("task_train.jsonl", "task_test.jsonl", "mixed_train.jsonl"):
        with open(tmp_path / name, "rb") as f, open(os.path.join(DATA, name), "rb") as g:
            assert f.read() == g.read(), f"{name} differs from python data/make_task.py output"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_make_task_seed_changes_output_and_sizes_are_flags(tmp_path):
    make_task = load_make_task()
    make_task.main(["--out-dir", str(tmp_path), "--seed", "3", "--train", "50", "--test", "10"])
    train = [json.loads(line) for line in open(tmp_path / "task_train.jsonl")]
    test = [json.loads(line) for line in open(tmp_path / "task_test.jsonl")]
    assert (len(train), len(test)) == (50, 10)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    committed = set(prompts("task_train.jsonl"))
    assert len({r["prompt"] for r in train} - committed) > 40


def test_make_task_rejects_bad_harmful_file_before_writing(tmp_path):
    make_task = load_make_task()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        make_task.main(["--out-dir", str(out), "--harmful", str(bad)])
    assert "bad.jsonl:1" in str(err.value)
    assert not out.exists()
