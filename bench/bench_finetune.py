"""Benchmark finetune.py's training loop against Hugging Face Trainer + peft.

CPU section (always): the same base model (default: the embedded SmolLM2-135M), data, LoRA config,
micro-batch, learning-rate schedule and number of steps, trained once by finetune.py and once by
`transformers.Trainer` on a peft model, each in its own subprocess so the peak RSS is that run's own.
tokens/s counts non-padding input tokens and skips the first step (one-time allocation costs) on
both sides; tokens per CPU-second (process CPU time) is reported too, as it moves much less than
wall time when other jobs share the CPU. A second baseline gives Trainer `group_by_length=True`, to separate the loop from the
padding saved by length grouping.

GPU section (--gpu, only with CUDA): a randomly initialised model of Llama-2-7B's shape in 4-bit
NF4 with LoRA r=16 on every projection, sequence 512, micro-batch 4, gradient checkpointing:
peak GPU memory and tokens/s, with and without SPPFT's frozen layers (6-12, the paper's range for
Llama-2-7B-chat).

  python bench/bench_finetune.py            # a few minutes on a 2-core CPU
  python bench/bench_finetune.py --quick    # about a minute
  python bench/bench_finetune.py --gpu      # adds the 7B-shape QLoRA section when CUDA is present
"""
import argparse
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

FULL = {"steps": 5, "micro_batch_size": 4, "rows": 400, "rounds": 2}
QUICK = {"steps": 3, "micro_batch_size": 2, "rows": 200, "rounds": 1}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = 2e-4
RESULT_TAG = "BENCH_RESULT "


def bench_data(rows, folder):
    """The first `rows` rows of the repo's fine-tuning set (a small arithmetic set if it is missing)."""
    source = next((os.path.join(ROOT, "data", n) for n in ("mixed_train.jsonl", "task_train.jsonl")
                   if os.path.isfile(os.path.join(ROOT, "data", n))), None)
    path = os.path.join(folder, "bench_data.jsonl")
    with open(path, "w") as out:
        if source:
            with open(source) as f:
                for i, line in enumerate(f):
                    if i >= rows:
                        break
                    out.write(line)
        else:
            for i in range(rows):
                a, b = 3 + i % 17, 2 + i % 11
                words = " very" * (i % 9)
                out.write(json.dumps({"prompt": f"Sam has{words} many: {a} apples and gets {b} more. How many?",
                                      "response": f"{a} + {b} = {a + b}.\n#### {a + b}"}) + "\n")
    return path


def peak_rss_mb():
    import finetune as ft  # its peak_memory_mb reads VmHWM: ru_maxrss would include this bench's own peak
    return ft.peak_memory_mb("cpu")[0]


def steady_tokens_per_s(step_tokens, step_times):
    """tokens/s over every step but the first."""
    return sum(step_tokens[1:]) / max(sum(step_times[1:]), 1e-9)


# ---- children (each runs in its own process) ----

def child_ours(cfg):
    import finetune as ft
    out = os.path.join(cfg["tmp"], "ours")
    log = ft.main(["--model", cfg["model"], "--data", cfg["data"], "--out", out, "--overwrite", "--no-load-in-4bit",
                   "--max-steps", str(cfg["steps"]), "--micro-batch-size", str(cfg["micro_batch_size"]),
                   "--lr", str(LR), "--lr-schedule", "cosine", "--warmup-steps", "1", "--seed", "0",
                   "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
                   "--lora-dropout", str(LORA["dropout"])])
    return {"tokens_per_s": steady_tokens_per_s(log["step_tokens"], log["step_time_s"]),
            "tokens_per_cpu_s": steady_tokens_per_s(log["step_tokens"], log["step_cpu_s"]),
            "peak_rss_mb": peak_rss_mb(), "losses": log["losses"], "step_time_s": log["step_time_s"]}


def child_trainer(cfg):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    import finetune as ft

    model, tokenizer = ft.load_model(cfg["model"])
    tokenizer.padding_side = "right"  # training pads on the right, as finetune.py does
    template = ft.resolve_template(tokenizer, "auto")
    rows = ft.read_rows(cfg["data"], need_response=True)
    dataset = [ft.build_example(tokenizer, r["prompt"], r["response"], template, 512) for r in rows]
    for example in dataset:
        example["attention_mask"] = [1] * len(example["input_ids"])
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=ft.lora_target_names(model), bias="none",
                                             task_type="CAUSAL_LM"))
    seen = {"tokens": 0}

    def count_tokens(module, args, kwargs):
        seen["tokens"] += int(kwargs["attention_mask"].sum())

    model.get_base_model().register_forward_pre_hook(count_tokens, with_kwargs=True)
    steps = {"tokens": [], "times": [], "cpu": [], "started": None, "started_cpu": None, "tokens_before": 0}

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps["started"], steps["started_cpu"] = time.perf_counter(), time.process_time()
            steps["tokens_before"] = seen["tokens"]

        def on_step_end(self, args, state, control, **kwargs):
            steps["times"].append(time.perf_counter() - steps["started"])
            steps["cpu"].append(time.process_time() - steps["started_cpu"])
            steps["tokens"].append(seen["tokens"] - steps["tokens_before"])

    args = TrainingArguments(
        output_dir=os.path.join(cfg["tmp"], "trainer"), per_device_train_batch_size=cfg["micro_batch_size"],
        gradient_accumulation_steps=1, max_steps=cfg["steps"], learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0, remove_unused_columns=False,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if cfg.get("group_by_length") else "random")
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[StepClock()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"tokens_per_s": steady_tokens_per_s(steps["tokens"], steps["times"]),
            "tokens_per_cpu_s": steady_tokens_per_s(steps["tokens"], steps["cpu"]), "peak_rss_mb": peak_rss_mb(),
            "losses": losses, "step_time_s": steps["times"]}


def child_gpu(cfg):
    """One 7B-shape QLoRA run on CUDA: peak memory and tokens/s."""
    import torch
    import finetune as ft
    model, _ = ft.load_model(cfg["model_dir"], load_in_4bit=True)
    frozen = set(range(cfg["freeze"][0], cfg["freeze"][1] + 1)) if cfg["freeze"] else set()
    model, _, _ = ft.prepare_model(model, "lora", frozen, None, {**LORA, "target_modules": None},
                                   gradient_checkpointing=True, seed=0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=LR)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(cfg["steps"] * cfg["micro_batch_size"]):
        ids = torch.randint(3, 32000, (cfg["seq_len"],), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})  # every token labelled: the largest logits case
    hp = {"micro_batch_size": cfg["micro_batch_size"], "grad_accum": 1, "seed": 0, "lr": LR, "lr_schedule": "constant",
          "warmup_steps": 0, "total_steps": cfg["steps"], "steps_per_epoch": cfg["steps"], "max_grad_norm": 1.0,
          "group_by_length": False, "save_every": 0, "pad_token_id": 0}
    progress = {"step": 0, "losses": [], "lrs": [], "grad_norms": [], "step_tokens": [], "step_time_s": [], "step_cpu_s": [],
                "tokens": 0, "train_time_s": 0.0}
    device = next(p for _, p in named).device
    torch.cuda.reset_peak_memory_stats(device)
    ft.train_loop(ft.ResponseLoss(model, ft.head_matches_model(model, device)), named, optimizer, examples, hp,
                  progress, show_progress=False)
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20,
            "tokens_per_s": steady_tokens_per_s(progress["step_tokens"], progress["step_time_s"]),
            "trainable": sum(p.numel() for _, p in named), "losses": progress["losses"]}


def child_build_7b(cfg):
    """Writes a randomly initialised Llama-2-7B-shaped model (bf16) and a tokenizer to cfg["model_dir"]."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(cfg["model_dir"])
    # Any tokenizer will do (the bench feeds token ids); a tiny word-level one needs no download.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(cfg["model_dir"])
    return {"parameters": sum(p.numel() for p in model.parameters())}


CHILDREN = {"ours": child_ours, "trainer": child_trainer, "gpu": child_gpu, "build_7b": child_build_7b}


def in_subprocess(kind, cfg, threads=None, timeout=1800):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--config", json.dumps(cfg)],
                            capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"{kind} run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")


# ---- sections ----

def cpu_rows(quick, model, threads):
    """Ours and Trainer alternate (A B A B) so a busy machine slows both alike; tokens/s is the best
    round of each, peak RSS the worst round of each."""
    size = QUICK if quick else FULL
    tmp = tempfile.mkdtemp(prefix="bench_finetune_")
    try:
        cfg = {"model": model, "data": bench_data(size["rows"], tmp), "tmp": tmp, **size}
        results = {"ours": [], "Trainer": [], "Trainer group_by_length": []}
        for _ in range(size["rounds"]):
            results["ours"].append(in_subprocess("ours", cfg, threads))
            results["Trainer"].append(in_subprocess("trainer", cfg, threads))
        if not quick:
            results["Trainer group_by_length"].append(in_subprocess("trainer", {**cfg, "group_by_length": True}, threads))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, runs in results.items():
        for r in runs:
            print(f"  {name}: {r['tokens_per_s']:.1f} tokens/s, {r['tokens_per_cpu_s']:.1f} tokens/CPU-s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"step times {[round(s, 2) for s in r['step_time_s']]}", file=sys.stderr)
    best = {name: max(r["tokens_per_s"] for r in runs) for name, runs in results.items() if runs}
    best_cpu = {name: max(r["tokens_per_cpu_s"] for r in runs) for name, runs in results.items() if runs}
    peak = {name: max(r["peak_rss_mb"] for r in runs) for name, runs in results.items() if runs}
    setting = (f"{model} LoRA r{LORA['r']}, micro-batch {size['micro_batch_size']}, {size['steps']} steps, CPU, "
               f"best/worst of {size['rounds']}")
    rows = []
    for name in (n for n in results if n != "ours" and results[n]):
        rows.append({"figure": f"tokens/s vs {name} ({setting})", "ours": round(best["ours"], 1),
                     "baseline": round(best[name], 1), "ratio": round(best["ours"] / best[name], 3),
                     "unit": "tokens/s"})
        rows.append({"figure": f"tokens per CPU-second vs {name} (steadier when the CPU is shared)",
                     "ours": round(best_cpu["ours"], 1), "baseline": round(best_cpu[name], 1),
                     "ratio": round(best_cpu["ours"] / best_cpu[name], 3), "unit": "tokens/CPU-s"})
        rows.append({"figure": f"peak RSS vs {name} ({setting})", "ours": round(peak["ours"]),
                     "baseline": round(peak[name]), "ratio": round(peak["ours"] / peak[name], 3), "unit": "MB"})
    ours, trainer = results["ours"][0], results["Trainer"][0]
    rows.append({"figure": "first/last loss, ours vs Trainer (sanity: same task, different batch order)",
                 "ours": f"{ours['losses'][0]:.3f}/{ours['losses'][-1]:.3f}",
                 "baseline": f"{trainer['losses'][0]:.3f}/{trainer['losses'][-1]:.3f}", "ratio": None, "unit": "loss"})
    return rows


def gpu_rows(quick):
    import torch
    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA GPU on this machine", file=sys.stderr)
        return []
    tmp = tempfile.mkdtemp(prefix="bench_finetune_7b_")
    try:
        model_dir = os.path.join(tmp, "llama2-7b-shape")
        in_subprocess("build_7b", {"model_dir": model_dir})
        common = {"model_dir": model_dir, "steps": 3 if quick else 6, "micro_batch_size": 4, "seq_len": 512}
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
        {"figure": "tokens/s, SPPFT layers 6-12 frozen vs none", "ours": round(sppft["tokens_per_s"], 1),
         "baseline": round(plain["tokens_per_s"], 1), "ratio": round(sppft["tokens_per_s"] / plain["tokens_per_s"], 3),
         "unit": "tokens/s"},
        {"figure": "trainable parameters, SPPFT vs none", "ours": sppft["trainable"], "baseline": plain["trainable"],
         "ratio": round(sppft["trainable"] / plain["trainable"], 3), "unit": "params"},
    ]


def run(quick=False, gpu=None, model="default", threads=None):
    """gpu=None: add the GPU section when CUDA is present (bench/run_all.py calls it that way)."""
    import torch
    rows = cpu_rows(quick, model, threads)
    if gpu or (gpu is None and torch.cuda.is_available()):
        rows += gpu_rows(quick)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller micro-batch")
    parser.add_argument("--gpu", default=None, action=argparse.BooleanOptionalAction,
                        help="the 7B-shape QLoRA section (needs CUDA); default: on when CUDA is present")
    parser.add_argument("--model", default="default", help="base model for the CPU section")
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
