"""Benchmark train_sv.py (CPU): what the response-span loss saves, and what the vectors do.

    python bench/bench_train_sv.py [--quick] [--model smollm2]

Figures (baseline measured in the same run, same model, same LoRA, same batches):
- seconds (wall and CPU) per optimizer step (8 rows, LoRA on every projection): safeft.response_loss_sum, the
  loss train_sv.py's Trainer uses, which sends only the positions that predict response tokens through the output
  layer, vs. the usual full-sequence logits + transformers' own loss;
- logit floats computed per step: the same two, counted;
- (full run only) response loss on 32 training rows after one epoch of train_sv.py's Trainer: vectors active vs.
  the base.
The default model is SmolLM2-135M, the model the README's table was first measured on, so the rows compare.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from table import print_table  # noqa: E402  (bench/ is on the path: this file's folder)

import safeft  # noqa: E402
import train_sv  # noqa: E402


def _timed_steps(optimizer, batches, loss_fn):
    """(wall seconds, CPU seconds of this process) per step."""
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - wall) / len(batches), (time.process_time() - cpu) / len(batches)


def vectors_on(model_name, args):
    """The base prepared as train_sv.py prepares it, with fresh security vectors."""
    model = safeft.prepare_for_training(safeft.load_model(model_name), False, False)
    safeft.set_seed(0)
    return train_sv.attach_security_vectors(model, args, safeft.projection_names(model))


def run(quick=False, model_name="smollm2"):
    safeft.quiet_libraries()
    args = train_sv.build_parser().parse_args(["--model", model_name, "--epochs", "1", "--no-gradient-checkpointing",
                                               "--report-to", "none"])
    tokenizer, template = safeft.load_tokenizer(model_name)
    rows = safeft.read_rows(os.path.join(ROOT, train_sv.DEFAULT_DATA), need_response=True)
    examples = safeft.build_examples(tokenizer, rows, template, args.max_length, "--data")
    pad = tokenizer.pad_token_id
    steps = 1 if quick else 2
    batches = [safeft.collate(examples[i * 8:(i + 1) * 8], pad) for i in range(steps)]

    # 1. Seconds per step, our loss vs. the full-logits loss, interleaved so other load hits both alike.
    timing_args = train_sv.build_parser().parse_args(["--lora-dropout", "0"])
    peft_model = vectors_on(model_name, timing_args)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-6)  # timing only

    def ours(batch):
        loss_sum, count = safeft.response_loss_sum(peft_model, batch)
        return loss_sum / count

    def baseline(batch):
        return peft_model(**batch).loss

    _timed_steps(optimizer, batches[:1], ours)  # warm-up
    ours_s, base_s = [], []
    for _ in range(2):
        ours_s.append(_timed_steps(optimizer, batches, ours))
        base_s.append(_timed_steps(optimizer, batches, baseline))
    results = [{"figure": "s per step, 8 rows (response-span vs full logits)", "ours": min(t[0] for t in ours_s),
                "baseline": min(t[0] for t in base_s), "unit": "s"},
               {"figure": "CPU s per step, same (steadier when the CPU is shared)",
                "ours": min(t[1] for t in ours_s), "baseline": min(t[1] for t in base_s), "unit": "CPU-s"}]

    # 2. Logit floats computed: response_loss_sum keeps the logits from the first position that predicts a
    # response token to the end of the (left-padded) batch; the baseline computes every position.
    vocab = peft_model.get_base_model().config.vocab_size
    ours_floats = base_floats = 0
    for batch in batches:
        first = int((batch["labels"][:, 1:] != -100).any(0).nonzero()[0])
        ours_floats += batch["labels"].shape[0] * (batch["labels"].shape[1] - first) * vocab
        base_floats += batch["labels"].numel() * vocab
    results.append({"figure": "logits floats per step (response-span vs full)", "ours": ours_floats / len(batches),
                    "baseline": base_floats / len(batches), "unit": "floats"})

    # 3. What one epoch of train_sv.py's training does to the response loss.
    if not quick:
        safeft.set_seed(0)
        vectors = vectors_on(model_name, args)
        with tempfile.TemporaryDirectory() as scratch:
            train_sv.train_vectors(vectors, examples, None, args, safeft.training_arguments(args, None), 0.0, pad,
                                   scratch)
        active, _ = safeft.token_mean(vectors, safeft.response_loss_sum, examples[:32], pad, 16)
        with vectors.disable_adapter():
            inactive, _ = safeft.token_mean(vectors, safeft.response_loss_sum, examples[:32], pad, 16)
        results.append({"figure": "response loss, 32 train rows, 1 epoch (vectors vs base)", "ours": active,
                        "baseline": inactive, "unit": "nats/token"})
    for row in results:
        row["ratio"] = row["ours"] / row["baseline"] if row["baseline"] else None
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed step each, no training figure")
    parser.add_argument("--model", default="smollm2", help="model to measure (any --model train_sv.py takes)")
    args = parser.parse_args(argv)
    print_table(run(quick=args.quick, model_name=args.model))


if __name__ == "__main__":
    main()
