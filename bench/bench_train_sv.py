"""Benchmark train_sv.py on the default model (CPU): what the response-span loss saves, and what the vectors do.

    python bench/bench_train_sv.py [--quick]

Figures (baseline measured in the same run):
- seconds per optimizer step (8 rows, LoRA on every projection): our loss, which sends only the positions that
  predict response tokens through the output layer, vs. the usual full-sequence logits + transformers' loss;
- logits held per step (floats): the same two, counted;
- (full run only) response loss on 32 training rows after one epoch of training: vectors active vs. the base.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_sv  # noqa: E402
from table import print_table  # noqa: E402  (bench/ is on the path: this file's folder)


def _timed_steps(peft_model, optimizer, batches, loss_fn):
    start = time.perf_counter()
    for batch in batches:
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


def run(quick=False):
    train_sv.set_seed(0)
    model, tokenizer = train_sv.load_model("default")
    template = train_sv.resolve_template(tokenizer, "auto")
    rows = train_sv.read_rows(os.path.join(ROOT, train_sv.DEFAULT_DATA), need_response=True)
    examples = train_sv.make_examples(tokenizer, rows, template, train_sv.DEFAULT_MAX_LENGTH, "harmful_train")
    peft_model = train_sv.attach_security_vectors(model, train_sv.DEFAULT_RANK, train_sv.DEFAULT_ALPHA, 0.0,
                                                  train_sv.linear_module_names(model))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)  # tiny steps: timing only
    pad = tokenizer.pad_token_id
    steps = 1 if quick else 2
    batches = [train_sv.collate_examples(examples[i * 8:(i + 1) * 8], pad) for i in range(steps)]

    def ours(batch):
        nll, count = train_sv.response_nll(peft_model, batch)
        return nll.sum() / count.sum()

    def baseline(batch):
        return peft_model(**batch).loss

    _timed_steps(peft_model, optimizer, batches[:1], ours)  # warm-up
    ours_s, base_s = [], []
    for _ in range(2):  # interleaved, so load from other processes hits both alike
        ours_s.append(_timed_steps(peft_model, optimizer, batches, ours))
        base_s.append(_timed_steps(peft_model, optimizer, batches, baseline))
    results = [{"figure": "s per step, 8 rows (response-span vs full logits)", "ours": min(ours_s),
                "baseline": min(base_s), "unit": "s"}]

    vocab = peft_model.get_base_model().config.vocab_size
    ours_floats = base_floats = 0
    for batch in batches:
        targets_at = (batch["labels"][:, 1:] != -100).any(0).nonzero().flatten()
        ours_floats += batch["labels"].shape[0] * (int(targets_at[-1]) - int(targets_at[0]) + 1) * vocab
        base_floats += batch["labels"].numel() * vocab
    results.append({"figure": "logits floats per step (response-span vs full)", "ours": ours_floats / len(batches),
                    "baseline": base_floats / len(batches), "unit": "floats"})

    if not quick:
        fresh, _ = train_sv.load_model("default")
        train_sv.set_seed(0)
        vectors = train_sv.attach_security_vectors(fresh, train_sv.DEFAULT_RANK, train_sv.DEFAULT_ALPHA,
                                                   train_sv.DEFAULT_DROPOUT, train_sv.linear_module_names(fresh))
        train_sv.train_security_vectors(vectors, examples, pad, lr=train_sv.DEFAULT_LR, epochs=1,
                                        batch_size=train_sv.DEFAULT_BATCH_SIZE, grad_accum=train_sv.DEFAULT_GRAD_ACCUM)
        active = train_sv.mean_response_loss(vectors, examples[:32], pad, 16)
        with vectors.disable_adapter():
            inactive = train_sv.mean_response_loss(vectors, examples[:32], pad, 16)
        results.append({"figure": "response loss, 32 train rows, 1 epoch (vectors vs base)", "ours": active,
                        "baseline": inactive, "unit": "nats/token"})
    for row in results:
        row["ratio"] = row["ours"] / row["baseline"] if row["baseline"] else None
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed step each, no training figure")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print_table(results)


if __name__ == "__main__":
    main()
