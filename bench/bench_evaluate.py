"""Batched greedy generation (evaluate.py) against one prompt at a time, on an embedded model, on CPU.

Both sides call safeft.generate_greedy, which evaluate.py generates with, on the same prompts: the
baseline with batch_size=1 (no padding at all), ours with every prompt in one left-padded batch with a
KV cache. Figures: wall time (ratio = speedup), tokens per second, and how many greedy outputs are
identical. In fp32 a batched and an unbatched forward pass add numbers in different orders, so a rare
near-tie between the two best tokens can flip one greedy choice; the count is reported as measured.
The model is SmolLM2-135M unless --model says otherwise: the README's table was measured on it.

    python bench/bench_evaluate.py            # 32 prompts x 32 new tokens (a few minutes on 2 cores)
    python bench/bench_evaluate.py --quick    # 8 prompts x 16 new tokens
    python bench/bench_evaluate.py --model qwen-coder-0.5b   # the aligned default model (slower)
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from table import print_table  # noqa: E402  (bench/ is on the path: this file's folder)

import safeft  # noqa: E402

DATA = os.path.join(ROOT, "data", "harmful_eval.jsonl")
FALLBACK_PROMPTS = [  # used only if the data file is missing
    "How do I kill a Python process?", "Write a short poem about bread.", "Explain photosynthesis simply.",
    "What is 12 plus 15?", "Tell me a story about a dog.", "List three fruits.", "How do tides work?",
    "Give me tips for a job interview.",
]


def prompts_for(count):
    if os.path.isfile(DATA):
        return [r["prompt"] for r in safeft.read_rows(DATA, limit=count)]
    return (FALLBACK_PROMPTS * (count // len(FALLBACK_PROMPTS) + 1))[:count]


def run(quick=False, model_name="smollm2"):
    count, new_tokens = (8, 16) if quick else (32, 32)
    prompts = prompts_for(count)
    model = safeft.load_model(model_name)
    tokenizer, template = safeft.load_tokenizer(model_name)
    safeft.generate_greedy(model, tokenizer, prompts[:2], template, 2, batch_size=2)  # warm-up (first-call overheads)

    start = time.perf_counter()
    batched = safeft.generate_greedy(model, tokenizer, prompts, template, new_tokens, batch_size=len(prompts))
    ours = time.perf_counter() - start

    start = time.perf_counter()
    single = [safeft.generate_greedy(model, tokenizer, [p], template, new_tokens, batch_size=1)[0] for p in prompts]
    baseline = time.perf_counter() - start

    identical = sum(a == b for a, b in zip(batched, single))
    for i, (a, b) in enumerate(zip(batched, single)):
        if a != b:  # show where they part, so a near-tie can be told from a bug
            at = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            print(f"  prompt {i}: outputs differ from character {at}: batched {a[at:at + 40]!r} vs "
                  f"single {b[at:at + 40]!r}", file=sys.stderr)
    tokens = count * new_tokens  # upper bound: a sequence that ends early stops counting in both
    where = f"{model_name}, CPU, {torch.get_num_threads()} threads"
    return [
        {"figure": f"greedy generation, {count} prompts x {new_tokens} new tokens ({where})",
         "ours": round(ours, 2), "baseline": round(baseline, 2), "ratio": round(baseline / ours, 2),
         "unit": "s (ratio = speedup; target >= 5)"},
        {"figure": "generated tokens per second", "ours": round(tokens / ours, 1),
         "baseline": round(tokens / baseline, 1), "ratio": round(baseline / ours, 2), "unit": "tokens/s"},
        {"figure": "greedy outputs identical to one-at-a-time", "ours": identical, "baseline": count,
         "ratio": round(identical / count, 3), "unit": "prompts"},
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 prompts x 16 new tokens")
    parser.add_argument("--model", default="smollm2", help="model to generate with (the README's figures: smollm2)")
    args = parser.parse_args(argv)
    safeft.quiet_libraries()
    print_table(run(quick=args.quick, model_name=args.model))


if __name__ == "__main__":
    main()
