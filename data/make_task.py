"""Generates the benign fine-tuning task: small addition/subtraction word problems with a checkable answer.

The task exists to show that fine-tuning still learns something while the safety methods are on
(SPPFT, Li et al. 2025; security vectors, Zhou et al. 2023). Each row is
{"prompt": question, "response": short worked answer ending in a line "#### N", "answer": "N"},
the "####" convention of GSM8K, so evaluate.py can read the answer the same way for both.
Problems use two or three numbers from 2 to 20 and never have a negative answer; every worked
answer writes the numbers in the order the question states them, so a test can recompute it.

Writes, into --out-dir (atomically, replacing what is there):
  task_train.jsonl   --train rows
  task_test.jsonl    --test rows, no prompt shared with train
  mixed_train.jsonl  task_train + the --harmful rows, shuffled, each with "source": "task"|"harmful"
                     (the harmful fine-tuning attack set)

Standard library only; the same --seed always gives byte-identical files.

    python data/make_task.py
    python data/make_task.py --out-dir /tmp/task --seed 1
"""
import argparse
import json
import os
import random
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LOW, HIGH = 2, 20

NAMES = [("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She"), ("Omar", "He"),
         ("Lena", "She"), ("Ravi", "He"), ("Emma", "She"), ("Sam", "He"), ("Priya", "She"), ("Jack", "He"),
         ("Sofia", "She"), ("Ben", "He"), ("Yuki", "She"), ("Carlos", "He"), ("Nora", "She"), ("Tom", "He"),
         ("Amara", "She"), ("Felix", "He"), ("Hana", "She"), ("Ivan", "He"), ("Grace", "She"), ("Luca", "He")]
THINGS = ["stickers", "marbles", "pencils", "books", "shells", "stamps", "coins", "balloons", "crayons",
          "trading cards", "toy cars", "beads", "buttons", "postcards", "keychains", "paper cranes"]
FOODS = ["cookies", "muffins", "cupcakes", "brownies", "scones", "pancakes", "dumplings", "bread rolls"]
GAIN = ["finds", "buys", "gets", "wins", "is given"]
LOSE = ["gives away", "loses", "sells", "trades away", "gives his sister"]
LOSE_PAST = ["gave away", "lost", "sold", "traded away", "donated"]
GAIN_PAST = ["found", "bought", "got", "won", "was given"]
WHEN = [("on Monday", "on Tuesday", "on Wednesday"), ("on Friday", "on Saturday", "on Sunday"),
        ("in the morning", "at noon", "in the evening")]


def make_problem(rng):
    """One (prompt, terms, closing) triple: terms are the signed numbers of the worked answer, in prompt order."""
    (name, pron), (other, _), (third, _) = rng.sample(NAMES, 3)
    things, food = rng.choice(THINGS), rng.choice(FOODS)
    a, b, c = (rng.randint(LOW, HIGH) for _ in range(3))
    kind = rng.randrange(16)
    lose = rng.choice(LOSE).replace("his", "her" if pron == "She" else "his")
    if kind == 0:
        return (f"{name} has {a} {things}. {pron} {rng.choice(GAIN)} {b} more. How many {things} does {name} have now?",
                [a, b], f"{name} has {{n}} {things} now.")
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return (f"{name} had {a} {things}. {pron} {rng.choice(LOSE_PAST)} {b} of them. How many {things} does {name} have left?",
                [a, -b], f"{name} has {{n}} {things} left.")
    if kind == 2:
        return (f"{name} has {a} {things} and {other} has {b} {things}. How many {things} do they have altogether?",
                [a, b], f"Together they have {{n}} {things}.")
    if kind == 3:
        a, b = max(a, b), min(a, b)
        return (f"{name} has {a} {things}. {other} has {b} {things}. How many more {things} does {name} have than {other}?",
                [a, -b], f"{name} has {{n}} more {things}.")
    if kind == 4:
        return (f"{other} has {a} {things}. {name} has {b} more {things} than {other}. How many {things} does {name} have?",
                [a, b], f"{name} has {{n}} {things}.")
    if kind == 5:
        a, b = max(a, b), min(a, b)
        return (f"{other} has {a} {things}. {name} has {b} fewer {things} than {other}. How many {things} does {name} have?",
                [a, -b], f"{name} has {{n}} {things}.")
    if kind == 6:
        a, b = max(a, b), min(a, b)
        return (f"{name} wants to collect {a} {things}. {pron} already has {b}. How many more {things} does {name} need?",
                [a, -b], f"{name} needs {{n}} more {things}.")
    if kind == 7:
        a, b = max(a, b), min(a, b)
        return (f"There are {a} people on a bus. At the next stop, {b} people get off. How many people are on the bus now?",
                [a, -b], "There are {n} people on the bus now.")
    if kind == 8:
        return (f"A shelf holds {a} books. {name} puts {b} more books on it. How many books are on the shelf now?",
                [a, b], "There are {n} books on the shelf.")
    if kind == 9:
        c = min(c, a + b)
        return (f"{name} has {a} {things}. {pron} {rng.choice(GAIN)} {b} more and then {lose} {c}. How many {things} does {name} have now?",
                [a, b, -c], f"{name} has {{n}} {things} now.")
    if kind == 10:
        a, b = max(a, b), min(a, b)
        return (f"{name} had {a} {things}. {pron} {rng.choice(LOSE_PAST)} {b}, then {rng.choice(GAIN_PAST)} {c}. How many {things} does {name} have now?",
                [a, -b, c], f"{name} has {{n}} {things} now.")
    if kind == 11:
        first, second, last = rng.choice(WHEN)
        return (f"{name} collected {a} {things} {first}, {b} {second} and {c} {last}. "
                f"How many {things} did {name} collect in total?",
                [a, b, c], f"{name} collected {{n}} {things}.")
    if kind == 12:
        if a < b + c:  # keep most answers above zero
            a = b + c + rng.randint(0, 9)
        return (f"A shop had {a} {food}. It sold {b} in the morning and {c} in the afternoon. How many {food} are left?",
                [a, -b, -c], f"The shop has {{n}} {food} left.")
    if kind == 13:
        a, b = max(a, b), min(a, b)
        return (f"A bus has {a} passengers. At a stop, {b} get off and {c} get on. How many passengers are on the bus now?",
                [a, -b, c], "There are {n} passengers on the bus now.")
    if kind == 14:
        return (f"{name} has {a} {things}, {other} has {b} and {third} has {c}. How many {things} do the three of them have?",
                [a, b, c], f"The three of them have {{n}} {things}.")
    if a < b + c:
        a = b + c + rng.randint(0, 9)
    return (f"{name} made {a} {food}. {pron} ate {b} and gave {c} to friends. How many {food} are left?",
            [a, -b, -c], f"{name} has {{n}} {food} left.")


def worked_answer(terms, closing):
    total = sum(terms)
    equation = str(terms[0]) + "".join(f" {'+' if t > 0 else '-'} {abs(t)}" for t in terms[1:])
    return f"{equation} = {total}. {closing.format(n=total)}\n#### {total}", str(total)


def generate(seed, n_train, n_test):
    """Distinct problems: the first n_test go to test, the next n_train to train (so they never overlap)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n_train + n_test:
        attempts += 1
        if attempts > 100 * (n_train + n_test):
            raise SystemExit("error: could not generate enough distinct problems")
        prompt, terms, closing = make_problem(rng)
        if prompt in seen or sum(terms) < 0 or sum(terms) == 1:  # 1 would need singular nouns
            continue
        seen.add(prompt)
        response, answer = worked_answer(terms, closing)
        rows.append({"prompt": prompt, "response": response, "answer": answer})
    return rows[n_test:], rows[:n_test]


def read_harmful(path):
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path}:{number}: not valid JSON ({e.msg})")
                if not isinstance(record, dict) or not record.get("prompt") or not record.get("response"):
                    raise SystemExit(f"error: {path}:{number}: needs non-empty 'prompt' and 'response'")
                rows.append({"prompt": record["prompt"], "response": record["response"]})
    except OSError as e:
        raise SystemExit(f"error: --harmful: cannot read {path} ({e.strerror})")
    if not rows:
        raise SystemExit(f"error: {path}: no rows")
    return rows


def write_jsonl_atomic(path, rows):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default=HERE, help="folder to write the three .jsonl files into")
    parser.add_argument("--harmful", default=os.path.join(HERE, "harmful_train.jsonl"),
                        help="harmful rows (prompt, response) mixed into mixed_train.jsonl")
    parser.add_argument("--train", type=int, default=1000, help="rows in task_train.jsonl")
    parser.add_argument("--test", type=int, default=200, help="rows in task_test.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        raise SystemExit("error: --train and --test must be at least 1")

    harmful = read_harmful(args.harmful)  # fail before writing anything
    train, test = generate(args.seed, args.train, args.test)
    mixed = [{"prompt": r["prompt"], "response": r["response"], "source": "task"} for r in train]
    mixed += [{"prompt": r["prompt"], "response": r["response"], "source": "harmful"} for r in harmful]
    random.Random(args.seed + 1).shuffle(mixed)

    os.makedirs(args.out_dir, exist_ok=True)
    outputs = {"task_train.jsonl": train, "task_test.jsonl": test, "mixed_train.jsonl": mixed}
    for name, rows in outputs.items():
        write_jsonl_atomic(os.path.join(args.out_dir, name), rows)
        print(f"wrote {len(rows):5d} rows to {os.path.join(args.out_dir, name)}")


if __name__ == "__main__":
    main()
