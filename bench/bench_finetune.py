"""Benchmark finetune.py against transformers' Trainer + peft with the standard full-logits loss.

CPU section (always; on a GPU host it runs on the GPU, in the mixed precision finetune.py uses, and its rows say
so): the same base model (default: the embedded SmolLM2-135M), data, LoRA, micro-batch, learning-rate schedule and
number of steps, trained by finetune.py and by a plain `Trainer` on a peft model (right padding,
DataCollatorForSeq2Seq, the model's own loss over logits at every position). Each run is its own subprocess; its
peak RSS is counted from the start of training (the load's brief peak left out). Both sides are timed by the same
Trainer callback: non-padding input tokens per second over every step but the first (one-time allocations), and
per CPU-second of the process (steadier when other jobs share the CPU). A second baseline gives the Trainer length
grouping too, the sampler finetune.py uses by default, which leaves the loss (LM head only on answer positions)
and left padding as the difference.

GPU section (--gpu, only with CUDA): finetune.py on a randomly initialised model of Llama-2-7B's shape in 4-bit
NF4 with LoRA r=16 on every projection, sequence 512, micro-batch 4, gradient checkpointing: peak GPU memory and
tokens/s, with and without SPPFT's frozen layers (6-12, the paper's range for Llama-2-7B-chat).

  python bench/bench_finetune.py                 # about 15 minutes on a busy 2-core CPU
  python bench/bench_finetune.py --quick         # fewer steps, one round
  python bench/bench_finetune.py --threads 1     # OMP_NUM_THREADS for the training processes
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from table import print_table  # noqa: E402  (bench/ is on the path: this file's folder)

FULL = {"steps": 6, "micro_batch_size": 4, "rows": 400, "rounds": 3}
QUICK = {"steps": 4, "micro_batch_size": 4, "rows": 200, "rounds": 1}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = 2e-4
RESULT_TAG = "BENCH_RESULT "


def bench_data(rows, folder):
    """The first `rows` rows of the repo's fine-tuning set."""
    path = os.path.join(folder, "bench_data.jsonl")
    with open(os.path.join(ROOT, "data", "mixed_train.jsonl")) as f, open(path, "w") as out:
        out.writelines(line for _, line in zip(range(rows), f))
    return path


def step_clock():
    """A Trainer callback timing every optimizer step: wall and CPU seconds, non-padding tokens."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self.tokens = [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            # Linux: "5" resets this process's peak RSS to its current RSS, so the peak read at the end is the
            # training's own (model + activations), not the load's (from_pretrained briefly holds two copies).
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = (time.perf_counter(), time.process_time(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            self.wall.append(time.perf_counter() - self.started[0])
            self.cpu.append(time.process_time() - self.started[1])
            self.tokens.append(state.num_input_tokens_seen - self.started[2])

        def result(self):
            import safeft
            steady = slice(1, None)  # the first step pays one-time allocations on both sides
            return {"tokens_per_s": sum(self.tokens[steady]) / max(sum(self.wall[steady]), 1e-9),
                    "tokens_per_cpu_s": sum(self.tokens[steady]) / max(sum(self.cpu[steady]), 1e-9),
                    "peak_rss_mb": safeft.peak_memory_mb("cpu")[0], "step_time_s": self.wall}

    return StepClock()


# ---- children (each runs in its own process) ----

def child_ours(cfg):
    """finetune.main as a user runs it, with the clock added to its Trainer."""
    import finetune
    import safeft
    clock, make_trainer = step_clock(), safeft.trainer_class

    def clocked_trainer_class():
        class Clocked(make_trainer()):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(clock)
        return Clocked

    safeft.trainer_class = clocked_trainer_class
    log = finetune.main(["--model", cfg["model"], "--data", cfg["data"], "--out", os.path.join(cfg["tmp"], "ours"),
                         "--overwrite", "--no-load-in-4bit", "--no-gradient-checkpointing", "--max-steps",
                         str(cfg["steps"]), "--micro-batch-size", str(cfg["micro_batch_size"]), "--lr", str(LR),
                         "--lr-schedule", "cosine", "--warmup-ratio", "0", "--seed", "0", "--lora-r", str(LORA["r"]),
                         "--lora-alpha", str(LORA["alpha"]), "--lora-dropout", str(LORA["dropout"])])
    return {**clock.result(), "losses": log["losses"]}


def child_trainer(cfg):
    """The baseline: Trainer + peft, right padding, the model's own full-logits loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    import safeft
    safeft.quiet_libraries()
    model = safeft.load_model(cfg["model"])
    tokenizer, template = safeft.load_tokenizer(cfg["model"])
    tokenizer.padding_side = "right"  # the usual training layout
    rows = safeft.read_rows(cfg["data"], need_response=True)
    examples = [{**e, "attention_mask": [1] * len(e["input_ids"])}
                for e in safeft.build_examples(tokenizer, rows, template, 512, "--data")]
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=safeft.projection_names(model), bias="none",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=os.path.join(cfg["tmp"], "trainer"), per_device_train_batch_size=cfg["micro_batch_size"],
        gradient_accumulation_steps=1, max_steps=cfg["steps"], learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=0, remove_unused_columns=False, disable_tqdm=True,
        **safeft.mixed_precision(),  # what ours trains under: on a GPU the two must compare alike
        dataloader_pin_memory=False, include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if cfg.get("group_by_length") else "random")
    clock = step_clock()
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=[clock],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True))
    trainer.train()
    return {**clock.result(), "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}


def child_gpu(cfg):
    """finetune.py on the 7B-shape model in 4-bit: peak GPU memory and tokens/s."""
    import finetune
    freeze = ["--freeze-layers", f"{cfg['freeze'][0]}-{cfg['freeze'][1]}"] if cfg["freeze"] else []
    log = finetune.main(["--model", cfg["model_dir"], "--data", cfg["data"], "--out", cfg["out"], "--overwrite",
                         "--load-in-4bit", "--gradient-checkpointing", "--template", "none", "--train-on-inputs",
                         "--max-length", str(cfg["seq_len"]), "--micro-batch-size", "4", "--max-steps",
                         str(cfg["steps"]), "--lr", str(LR)] + freeze)
    return {"peak_gpu_mb": log["peak_memory_mb"], "tokens_per_s": log["tokens_per_s"],
            "trainable": log["trainable_parameters"], "losses": log["losses"]}


def child_build_7b(cfg):
    """A randomly initialised Llama-2-7B-shaped model (bf16), a word-level tokenizer and rows of random words."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(cfg["model_dir"])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(1000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(cfg["model_dir"])
    rng = random.Random(0)
    with open(cfg["data"], "w") as f:  # every row fills the sequence: the largest activations case
        for _ in range(64):
            words = [f"w{rng.randrange(1000)}" for _ in range(cfg["seq_len"])]
            f.write(json.dumps({"prompt": " ".join(words[:8]), "response": " ".join(words[8:])}) + "\n")
    return {"parameters": sum(p.numel() for p in model.parameters())}


CHILDREN = {"ours": child_ours, "trainer": child_trainer, "gpu": child_gpu, "build_7b": child_build_7b}


def in_subprocess(kind, cfg, threads=None, timeout=3600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--config", json.dumps(cfg)],
                            capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"{kind} run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")


def head_prediction(model, data):
    """The tokens/s ratio that skipping the LM head on non-answer tokens predicts from the matrix work per token:
    every linear layer of the base model costs one multiply-add per weight per token, in the forward pass and
    again in the backward (the frozen weights need only the input's gradient), so the head's share of that work,
    times the share of tokens that are not answer tokens, is what our loss saves. Left out: LoRA's matrices,
    attention scores, norms and the optimizer (they dilute the saving), and the full logits' softmax and its
    gradient, memory-bound work the baseline does on every token (it adds to the saving). Returns (head share,
    answer share, predicted ratio)."""
    import torch

    import safeft
    shell = safeft.meta_model(safeft.load_config(model))
    head = shell.get_output_embeddings()
    work = sum(m.in_features * m.out_features for m in shell.modules() if isinstance(m, torch.nn.Linear))
    head_share = head.in_features * head.out_features / work
    tokenizer, template = safeft.load_tokenizer(model)
    examples = safeft.build_examples(tokenizer, safeft.read_rows(data, need_response=True), template, 512, "--data")
    tokens = sum(len(e["input_ids"]) for e in examples)
    answer_share = sum(label != -100 for e in examples for label in e["labels"]) / tokens
    return head_share, answer_share, 1 / (1 - head_share * (1 - answer_share))


# ---- sections ----

def cpu_rows(quick, model, threads):
    """Ours and the baselines alternate (A B C A B C) so a busy machine slows each alike; tokens/s is the best
    round of each, peak RSS the worst round of each."""
    import torch
    size = QUICK if quick else FULL
    tmp = tempfile.mkdtemp(prefix="bench_finetune_")
    runs = {"ours": [], "Trainer": [], "Trainer group_by_length": []}
    try:
        cfg = {"model": model, "data": bench_data(size["rows"], tmp), "tmp": tmp, **size}
        head_share, answer_share, predicted = head_prediction(model, cfg["data"])
        for _ in range(size["rounds"]):
            runs["ours"].append(in_subprocess("ours", cfg, threads))
            runs["Trainer"].append(in_subprocess("trainer", cfg, threads))
            runs["Trainer group_by_length"].append(in_subprocess("trainer", {**cfg, "group_by_length": True}, threads))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, results in runs.items():
        for r in results:
            print(f"  {name}: {r['tokens_per_s']:.1f} tokens/s, {r['tokens_per_cpu_s']:.1f} tokens/CPU-s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB, step times {[round(s, 2) for s in r['step_time_s']]}", file=sys.stderr)
    best = {name: max(r["tokens_per_s"] for r in results) for name, results in runs.items()}
    best_cpu = {name: max(r["tokens_per_cpu_s"] for r in results) for name, results in runs.items()}
    peak = {name: max(r["peak_rss_mb"] for r in results) for name, results in runs.items()}
    device = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else \
        f"CPU {threads or os.environ.get('OMP_NUM_THREADS') or os.cpu_count()} threads"
    setting = (f"{model}, LoRA r{LORA['r']}, micro-batch {size['micro_batch_size']}, {size['steps']} steps, "
               f"{device}, best/worst of {size['rounds']}")
    rows = []
    for name in ("Trainer", "Trainer group_by_length"):
        rows += [
            {"figure": f"tokens/s vs {name} + peft, full-logits loss ({setting})", "ours": round(best["ours"], 1),
             "baseline": round(best[name], 1), "ratio": round(best["ours"] / best[name], 3), "unit": "tokens/s"},
            {"figure": f"tokens per CPU-second vs {name} (steadier when the CPU is shared)",
             "ours": round(best_cpu["ours"], 1), "baseline": round(best_cpu[name], 1),
             "ratio": round(best_cpu["ours"] / best_cpu[name], 3), "unit": "tokens/CPU-s"},
            {"figure": f"peak RSS while training vs {name} ({setting})", "ours": round(peak["ours"]),
             "baseline": round(peak[name]), "ratio": round(peak["ours"] / peak[name], 3), "unit": "MB"}]
    rows.append({"figure": f"tokens/s ratio the matrix work predicts: the LM head does "
                           f"{head_share:.1%} of the base model's multiply-adds per token, and {1 - answer_share:.1%} "
                           f"of the rows' tokens are not answer tokens", "ours": None, "baseline": None,
                 "ratio": round(predicted, 3), "unit": "ratio"})
    ours, grouped = runs["ours"][0], runs["Trainer group_by_length"][0]
    rows.append({"figure": "first/last loss, ours vs Trainer group_by_length (same batches; sanity)",
                 "ours": f"{ours['losses'][0]:.3f}/{ours['losses'][-1]:.3f}",
                 "baseline": f"{grouped['losses'][0]:.3f}/{grouped['losses'][-1]:.3f}", "ratio": None, "unit": "loss"})
    return rows


def gpu_rows(quick):
    import torch
    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA GPU on this machine", file=sys.stderr)
        return []
    tmp = tempfile.mkdtemp(prefix="bench_finetune_7b_")
    try:
        common = {"model_dir": os.path.join(tmp, "llama2-7b-shape"), "data": os.path.join(tmp, "rows.jsonl"),
                  "out": os.path.join(tmp, "out"), "steps": 3 if quick else 6, "seq_len": 512}
        in_subprocess("build_7b", common)
        plain = in_subprocess("gpu", {**common, "freeze": None})
        sppft = in_subprocess("gpu", {**common, "freeze": [6, 12]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    setting = "Llama-2-7B shape, 4-bit NF4 + LoRA r16, seq 512, micro-batch 4, grad. checkpointing"
    return [
        {"figure": f"peak GPU memory ({setting}); baseline = target", "ours": round(plain["peak_gpu_mb"]),
         "baseline": 10 * 1024, "ratio": round(plain["peak_gpu_mb"] / (10 * 1024), 3), "unit": "MB"},
        {"figure": "tokens/s, same setting", "ours": round(plain["tokens_per_s"], 1), "baseline": None,
         "ratio": None, "unit": "tokens/s"},
        {"figure": "peak GPU memory, SPPFT layers 6-12 frozen vs none", "ours": round(sppft["peak_gpu_mb"]),
         "baseline": round(plain["peak_gpu_mb"]), "ratio": round(sppft["peak_gpu_mb"] / plain["peak_gpu_mb"], 3),
         "unit": "MB"},
        {"figure": "trainable parameters, SPPFT vs none", "ours": sppft["trainable"], "baseline": plain["trainable"],
         "ratio": round(sppft["trainable"] / plain["trainable"], 3), "unit": "params"},
    ]


def run(quick=False, gpu=None, model="smollm2", threads=None):
    """gpu=None: add the GPU section when CUDA is present (bench/run_all.py calls it that way)."""
    import torch
    rows = cpu_rows(quick, model, threads)
    if gpu or (gpu is None and torch.cuda.is_available()):
        rows += gpu_rows(quick)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and one round")
    parser.add_argument("--gpu", default=None, action=argparse.BooleanOptionalAction,
                        help="the 7B-shape QLoRA section (needs CUDA); default: on when CUDA is present")
    parser.add_argument("--model", default="smollm2", help="base model for the CPU section")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the training processes (1 is faster on a busy shared CPU)")
    parser.add_argument("--child", default=None, choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = CHILDREN[args.child](json.loads(args.config))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    started = time.time()
    print_table(run(quick=args.quick, gpu=args.gpu, model=args.model, threads=args.threads))
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
