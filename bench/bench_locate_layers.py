"""Stage 1 of locate_layers.py (hidden states + cosine statistics) against the original procedure.

Baseline, as the Safety Layers paper's code does it: for each of the 500 random pairs of each type
(NN, NM, MM), forward both prompts one at a time (batch 1, output_hidden_states=True, full logits) and
compute the pair's cosine similarity at every layer. So that both sides read the same vectors, the
last block's raw output comes from a forward hook (output_hidden_states norms the last entry).
Ours: locate_layers.last_token_states (every prompt forwarded once, left-padded batches, the shared
template prefix run once) + locate_layers.cosine_statistics (vectorised, with its bootstrap).
Also shown (not with --quick): ours without prefix sharing (what batching alone buys).

SmolLM2-135M-Instruct (the model of the README's table; --model for another), 100 normal + 100 malicious
prompts, 500 pairs per type, fp32 on CPU. The baseline's cost
is two forwards per pair whatever the pair, so it is measured on --baseline-pairs random pairs of the
500 per type and its time scaled to 500 (the figure says so); --baseline-pairs 500 measures it all
(3000 forwards, ~10+ minutes on 2 cores). The curves are compared on the measured pairs: our mean
cosines over those pairs (from our cached vectors) against the baseline's, max over layers and types.

    python bench/bench_locate_layers.py                  # baseline on 100 pairs/type (600 forwards)
    python bench/bench_locate_layers.py --quick          # baseline on 10 pairs/type
    python bench/bench_locate_layers.py --threads 1      # one thread for both sides (steadier on a busy machine)
    python bench/bench_locate_layers.py --model qwen-coder-0.5b   # the aligned default model (about 4x slower)
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from table import print_table  # noqa: E402  (bench/ is on the path: this file's folder)

import locate_layers as ll  # noqa: E402
import safeft  # noqa: E402

PROMPTS, PAIRS, SEED = 100, 500, 0
MODEL = "smollm2"  # the README's figures were measured on it


@torch.no_grad()
def baseline_pair_cosines(model, tokenizer, template, first, second):
    """The original procedure for one pair: each prompt forwarded alone, cosine at every layer (fp32)."""
    blocks = safeft.decoder_layers(model)
    vectors = []
    for prompt in (first, second):
        batch = safeft.encode_prompts(tokenizer, [safeft.format_prompt(tokenizer, prompt, template)], template)
        with ll.capture_last_token(blocks[-1:]) as last:
            hidden = model(**batch, output_hidden_states=True).hidden_states
        vectors.append(torch.stack([h[0, -1] for h in hidden[1:-1]] + [last[0][0][0]]))
    return torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=-1)


def run(quick=False, baseline_pairs=None, threads=None, model_name=MODEL):
    if threads:
        torch.set_num_threads(threads)
    baseline_pairs = baseline_pairs or (10 if quick else 100)
    tokenizer, template = safeft.load_tokenizer(model_name)
    model = safeft.load_model(model_name)
    normal = [r["prompt"] for r in safeft.read_rows(os.path.join(ROOT, "data/normal.jsonl"), limit=PROMPTS)]
    malicious = [r["prompt"] for r in safeft.read_rows(os.path.join(ROOT, "data/harmful_train.jsonl"), limit=PROMPTS)]
    ll.last_token_states(model, tokenizer, normal[:4], template, 4)  # warm-up (first-call overheads)
    baseline_pair_cosines(model, tokenizer, template, normal[0], normal[1])

    timings = {}
    for share in ((True,) if quick else (True, False)):  # --quick skips the no-prefix-sharing variant
        start = time.perf_counter()
        states = ll.last_token_states(model, tokenizer, normal + malicious, template, 32, share_prefix=share)
        ll.cosine_statistics(states[:PROMPTS], states[PROMPTS:], PAIRS, SEED)  # timed: it is part of stage 1
        timings[share] = time.perf_counter() - start
        if share:
            ours_states = states

    # The same pairs cosine_statistics drew, a random subset of them for the baseline.
    rng = np.random.default_rng(SEED)
    pairs = {"nn": ll.sample_pairs(PROMPTS, PROMPTS, PAIRS, rng, True),
             "nm": ll.sample_pairs(PROMPTS, PROMPTS, PAIRS, rng, False),
             "mm": ll.sample_pairs(PROMPTS, PROMPTS, PAIRS, rng, True)}
    sets = {"nn": (normal, normal), "nm": (normal, malicious), "mm": (malicious, malicious)}
    offsets = {"nn": (0, 0), "nm": (0, PROMPTS), "mm": (PROMPTS, PROMPTS)}
    pick = np.random.default_rng(SEED + 1)
    measured, worst, worst_pair = 0.0, 0.0, 0.0
    for kind, (first, second) in pairs.items():
        chosen = np.sort(pick.choice(len(first), size=min(baseline_pairs, len(first)), replace=False))
        start = time.perf_counter()
        base = torch.stack([baseline_pair_cosines(model, tokenizer, template, sets[kind][0][first[c]],
                                                  sets[kind][1][second[c]]) for c in chosen]).double().numpy()
        measured += time.perf_counter() - start
        a, b = offsets[kind]
        ours = ll.pair_cosines(ours_states, ours_states, first[chosen] + a, second[chosen] + b)
        worst = max(worst, float(np.abs(ours.mean(0) - base.mean(0)).max()))
        worst_pair = max(worst_pair, float(np.abs(ours - base).max()))
    total_pairs = sum(len(p[0]) for p in pairs.values())
    baseline = measured * total_pairs / (3 * min(baseline_pairs, PAIRS))
    scaled = ("" if baseline_pairs >= PAIRS else
              f", baseline measured on {baseline_pairs} pairs/type and scaled x{PAIRS / baseline_pairs:g}")
    setting = (f"{model_name}, {PROMPTS}+{PROMPTS} prompts, {PAIRS} pairs/type, CPU {torch.get_num_threads()} "
               f"threads{scaled}")
    return [
        {"figure": f"stage 1 wall time ({setting})", "ours": round(timings[True], 2), "baseline": round(baseline, 1),
         "ratio": round(baseline / timings[True], 1), "unit": "s (ratio = speedup; target >= 20)"},
    ] + ([] if quick else [
        {"figure": "stage 1 wall time, ours without prefix sharing (batching alone)", "ours": round(timings[False], 2),
         "baseline": round(baseline, 1), "ratio": round(baseline / timings[False], 1), "unit": "s"},
    ]) + [
        {"figure": f"max |mean cosine ours - baseline| over layers and NN/NM/MM "
                   f"({min(baseline_pairs, PAIRS)} pairs/type)",
         "ours": float(f"{worst:.3g}"), "baseline": 0.0, "ratio": None, "unit": "cosine (target <= 1e-4)"},
        {"figure": "max |cosine ours - baseline| of any single pair and layer", "ours": float(f"{worst_pair:.3g}"),
         "baseline": 0.0, "ratio": None, "unit": "cosine"},
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="baseline on 10 pairs per type")
    parser.add_argument("--baseline-pairs", type=int, default=None,
                        help="pairs per type the baseline really runs (default 100; 10 with --quick; 500 = all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--model", default=MODEL, help="model (default: the one of the README's table)")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick, baseline_pairs=args.baseline_pairs, threads=args.threads, model_name=args.model)
    print_table(rows)


if __name__ == "__main__":
    main()
