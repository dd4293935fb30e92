"""finetune.py: fine-tune an aligned chat LLM on your data without losing its safety.

Two published defences, each one flag away, usable together:
* SPPFT (Li et al., "Safety Layers in Aligned Large Language Models", ICLR 2025, arXiv 2408.17003):
  --freeze-layers keeps the safety layers found by locate_layers.py fixed. With --method full their attention and
  MLP weights get no gradient (the blocks' norms, embeddings and the other layers train, as in the authors' code);
  with --method lora no LoRA module is placed on them (PEFT's layers_to_transform).
* Security vectors (Zhou et al., "Making Harmful Behaviors Unlearnable for LLMs", arXiv 2311.02105):
  --security-vectors DIR loads train_sv.py's adapter and keeps it active and frozen (no dropout) in every training
  forward, so harmful examples in the data are already "learned" and carry little gradient. It is removed before
  saving: the output never contains it.

Training is transformers' Trainer with safeft's response-only loss (the LM head runs only where there is an answer
token), so checkpoints, --resume, gradient accumulation, mixed precision, --report-to and several processes
(torchrun or accelerate launch: DDP, FSDP, DeepSpeed) come from the library. LoRA loads the base in 4-bit NF4
(QLoRA) when a CUDA GPU is present or --load-in-4bit is given.

  python finetune.py --out runs/finetune --max-steps 20
  python finetune.py --freeze-layers runs/safety_layers.json --security-vectors runs/security_vectors
  python finetune.py --method full --freeze-layers 6-12 --data my_data.jsonl --epochs 3
  python finetune.py --save-every 50 ...     # after a stop, the same command + --resume runs/finetune-checkpoints
  torchrun --nproc_per_node 2 finetune.py --micro-batch-size 4 --grad-accum 2
  (notebook)  from finetune import main; main(["--data", "my_data.jsonl", "--max-steps", "20"])
"""
import argparse
import functools
import json
import os
import re
import shlex
import sys
import zipfile

import torch

import safeft
from safeft import CHECKPOINT_SETTINGS_FILE, SV_ADAPTER, UserError

DEFAULT_DATA = "data/mixed_train.jsonl"  # the benign task with harmful rows mixed in: the attack to survive
DEFAULT_OUT = "runs/finetune"
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}  # full fine-tuning moves every weight: a 10x smaller step
LOG_FORMAT = "finetune/v1"
TASK_ADAPTER = "default"  # PEFT saves the "default" adapter at the root of the output folder
TRAINABLE_FILE = "trainable.safetensors"  # in each checkpoint: exactly the weights that train
# The training flags that shape the weights; train_log.json records them and a --resume must repeat them.
HYPERPARAMETERS = safeft.TRAINING_FLAGS + ("train_on_inputs", "group_by_length", "seed")


# -- checks that need no weights --

def read_freeze(spec, num_layers, config=None):
    """--freeze-layers, a range like 6-12 or a safety_layers.json from locate_layers.py -> (what it said, the
    0-based layer indices to freeze); checked against the config (the json's recorded model too, given config)."""
    if not spec:
        return None, []
    flag = "--freeze-layers"
    if os.path.isfile(spec):
        data = safeft.read_json_file(spec, flag)
        if not isinstance(data, dict) or data.get("format") != safeft.SAFETY_LAYERS_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{flag}: {spec} is not a safety_layers.json (format {found!r}, expected "
                            f"{safeft.SAFETY_LAYERS_FORMAT!r} as locate_layers.py writes)")
        layers = data.get("safety_layers")
        if not (isinstance(layers, dict) and all(type(layers.get(k)) is int for k in ("start", "end"))):
            raise UserError(f"{flag}: {spec} has no integer safety_layers.start/end")
        if type(data.get("num_layers")) is not int or not 0 <= layers["start"] <= layers["end"]:
            raise UserError(f"{flag}: {spec} has no valid num_layers and layer range")
        if data["num_layers"] != num_layers:
            raise UserError(f"{flag}: {spec} was made for a model with {data['num_layers']} layers "
                            f"(model {data.get('model')!r}); this model has {num_layers}")
        # Another model with as many layers has its safety layers elsewhere: its fingerprint tells (as for adapters).
        if config is not None and isinstance(data.get("fingerprint"), dict):
            wrong = safeft.fingerprint_differences(data["fingerprint"], config)
            if wrong:
                raise UserError(f"{flag}: {spec} was made for another model ({data.get('model')!r}: "
                                f"{'; '.join(wrong)})")
        # Stage 1 found no clear range and no scaling search refined its fallback (--skip-scaling): the layers are
        # a guess, and the user may not have looked at the plot. A scaling search's result stands on its own.
        if data.get("fallback") and not str(data.get("safety_layers_source")).startswith("scaling search"):
            reason = str(data.get("fallback_reason") or "no reason recorded").strip().rstrip(".")
            print(f"warning: {flag} {spec} holds the layer search's fallback, not a detected range ({reason}); "
                  f"check its plot before relying on it", file=sys.stderr)
        freeze = {"start": layers["start"], "end": layers["end"], "source": spec, "model": data.get("model")}
    elif any(c.isdigit() for c in spec) and not spec.endswith(".json"):
        start, end = safeft.parse_layer_range(spec, flag)
        freeze = {"start": start, "end": end, "source": "range"}
    else:
        raise UserError(f"{flag}: '{spec}' is neither a range like 6-12 nor an existing safety_layers.json")
    safeft.check_layers_within(freeze["start"], freeze["end"], num_layers, flag)
    frozen = list(range(freeze["start"], freeze["end"] + 1))
    if len(frozen) == num_layers:  # SPPFT freezes a few middle layers; all of them leaves no block to train
        raise UserError(f"{flag}: {freeze['start']}-{freeze['end']} is every layer of this model, "
                        f"so no decoder block would train")
    return freeze, frozen


def checkpoint_root(args):
    return args.checkpoint_dir or os.path.abspath(args.out).rstrip(os.sep) + "-checkpoints"


def checkpoint_problem(path, processes):
    """Why the Trainer could not resume from this checkpoint folder (None: complete and readable). The Trainer
    writes a checkpoint file by file, so a stop while saving leaves a folder that lacks some or holds half of one;
    every file it will load is opened here, before the model loads."""
    from safetensors import SafetensorError, safe_open
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{i}.pth" for i in range(processes)]
    needed = [CHECKPOINT_SETTINGS_FILE, TRAINABLE_FILE, "optimizer.pt", "scheduler.pt"] + rng + ["trainer_state.json"]
    missing = [name for name in needed if not os.path.isfile(os.path.join(path, name))]
    if missing:
        return f"lacks {', '.join(missing)} (not a finetune.py checkpoint of {processes} process(es), or cut short)"
    for name in needed:
        file = os.path.join(path, name)
        try:
            if name.endswith(".json"):
                with open(file, encoding="utf-8") as f:
                    if not isinstance(json.load(f), dict):  # what the resume reads from it would be missing
                        return f"has a damaged {name} (not a JSON object)"
            elif name.endswith(".safetensors"):
                with safe_open(file, framework="pt") as f:  # checks the header against the file's size
                    list(f.keys())
            else:  # torch.save writes a zip, and a cut-off zip has lost its central directory
                zipfile.ZipFile(file).close()
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as e:
            return f"has a damaged {name} ({str(e).splitlines()[0][:100]})"
    return None


def newest_checkpoint(root, processes):
    """The newest complete checkpoint-N folder in root, or None."""
    names = [d for d in (os.listdir(root) if os.path.isdir(root) else []) if re.fullmatch(r"checkpoint-\d+", d)]
    for name in sorted(names, key=lambda d: int(d.split("-")[1]), reverse=True):
        if checkpoint_problem(os.path.join(root, name), processes) is None:
            return os.path.join(root, name)
    return None


def find_checkpoint(path, settings, processes):
    """--resume: a checkpoint folder (or the newest complete one in a checkpoint root) made with these flags."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CHECKPOINT_SETTINGS_FILE)):
        path = newest_checkpoint(path, processes) or path
    if not os.path.isdir(path):
        raise UserError(f"--resume: {path} is not a checkpoint folder")
    problem = checkpoint_problem(path, processes)
    if problem:
        raise UserError(f"--resume: {path} {problem}; resume from an earlier checkpoint")
    saved = safeft.read_json_file(os.path.join(path, CHECKPOINT_SETTINGS_FILE), "--resume")
    for flag, value in settings.items():
        if saved.get(flag) != value:
            raise UserError(f"--resume: {path} was made with {flag} {saved.get(flag)!r}, this run has {flag} "
                            f"{value!r}; a resumed run must repeat the interrupted one's settings")
    return path


# -- the model --

def attach_adapters(model, args, targets, frozen, vectors):
    """After this exactly the weights to train require grad. LoRA: the task adapter on the projections of the
    blocks not frozen. Full: every weight but the frozen blocks' attention and MLP (norms train, as in SPPFT).
    With security vectors their adapter takes part in every forward, frozen, in both modes."""
    from peft import get_peft_model
    if vectors:
        model = safeft.load_adapter(model, vectors, SV_ADAPTER, "--security-vectors")
        # Frozen vectors are a fixed function, the one train_sv.py checked: the Trainer's model.train() would switch
        # their own LoRA dropout back on, and random masks raise their loss on the harmful rows (more gradient
        # reaches the task weights). Their dropout served their own training only.
        for module in model.modules():
            dropout = getattr(module, "lora_dropout", None)
            if isinstance(dropout, torch.nn.ModuleDict) and SV_ADAPTER in dropout:
                dropout[SV_ADAPTER] = torch.nn.Identity()
    if args.method == "lora":
        keep = [i for i in range(len(safeft.decoder_layers(model))) if i not in frozen]
        config = safeft.lora_config(args, targets, layers_to_transform=keep if frozen else None)
        # The task adapter starts from --seed alone: loading the vectors drew random numbers (PEFT initialises an
        # adapter before loading its weights), and runs with and without them started from different weights.
        safeft.set_seed(args.seed)
        if vectors:
            model.add_adapter(TASK_ADAPTER, config)
            model.base_model.set_adapter([SV_ADAPTER, TASK_ADAPTER])  # both active in every forward
        else:
            model = get_peft_model(model, config, adapter_name=TASK_ADAPTER)
        for name, p in model.named_parameters():
            p.requires_grad_(f".{TASK_ADAPTER}." in name)
        return model
    for name, p in model.named_parameters():
        p.requires_grad_(f".{SV_ADAPTER}." not in name)
    layers = safeft.decoder_layers(model)
    for i in frozen:
        for _, p in safeft.sppft_frozen_weights(layers[i]):
            p.requires_grad_(False)
    return model


def adapter_weights(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def finetune_trainer(settings):
    """The shared Trainer (response-only loss) whose checkpoints hold the weights that train plus the flags that
    shaped them. The library's own checkpoint of a PeftModel would carry the security vectors too (in full mode
    only them), and its resume would leave only the first adapter active."""
    from safetensors.torch import load_file, save_file

    class FinetuneTrainer(safeft.trainer_class()):
        def _save(self, output_dir=None, state_dict=None):
            if not self.args.should_save:
                return
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            training = {n for n, p in self.model.named_parameters() if p.requires_grad}
            tensors = dict(self.model.named_parameters()) if state_dict is None else state_dict
            with safeft.atomic_file(os.path.join(output_dir, TRAINABLE_FILE), ".safetensors") as tmp:
                save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items() if n in training}, tmp)
            safeft.write_json_atomic(os.path.join(output_dir, CHECKPOINT_SETTINGS_FILE), settings)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            params = dict((model or self.model).named_parameters())
            saved = load_file(os.path.join(resume_from_checkpoint, TRAINABLE_FILE))
            if sorted(saved) != sorted(n for n, p in params.items() if p.requires_grad):
                raise UserError(f"--resume: {resume_from_checkpoint} holds other weights than this run trains")
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)

    return FinetuneTrainer


# -- the output --

def drop_security_vectors(model, method):
    """The vectors leave the model: what follows (saving, any later use) runs without them."""
    if method == "lora":
        model.delete_adapter(SV_ADAPTER)
        model.set_adapter(TASK_ADAPTER)
        return model
    return model.unload()  # strips the LoRA layers without merging them into the trained base weights


def check_output_clean(folder, method):
    """The output never carries the security vectors (nor, for a full model, any adapter weights)."""
    from safetensors import safe_open
    for root, _, files in os.walk(folder):
        if root != folder and "adapter_config.json" in files:
            raise RuntimeError(f"refusing to save: an extra adapter in {root}")
        for name in (f for f in files if f.endswith(".safetensors")):
            with safe_open(os.path.join(root, name), framework="pt") as f:
                bad = [k for k in f.keys() if SV_ADAPTER in k or (method == "full" and "lora_" in k)]
            if bad:
                raise RuntimeError(f"refusing to save: {name} holds weights that must not be saved ({bad[0]} ...)")


def resume_hint(args, argv):
    """Ctrl-C: what was kept, and the exact command that continues from it."""
    processes = safeft.launched_processes()
    last = newest_checkpoint(checkpoint_root(args), processes)  # a checkpoint cut short by the stop is passed over
    if not last:
        return f"no checkpoint was kept{'' if args.save_every else ' (--save-every N keeps one)'}; {args.out} " \
               f"was not written"
    words = [w for w in argv if not w.startswith("--resume=")]  # the same command, without an earlier --resume
    if "--resume" in words:
        del words[words.index("--resume"):words.index("--resume") + 2]
    launcher = f"torchrun --nproc_per_node {processes}" if processes > 1 else "python"
    script = os.path.relpath(os.path.abspath(__file__))
    script = os.path.abspath(__file__) if script.startswith("..") else script
    return f"kept {last}; continue with: {launcher} {shlex.join([script] + words + ['--resume', last])}"


def run_settings(args, frozen, load_in_4bit, template, targets, data_sha256, vectors_sha256, processes):
    """What shapes the weights, by flag: each checkpoint keeps it, and a --resume that differs is told which flag.
    The vectors by their weights' hash, not their path: retrained into the same folder, they are other vectors."""
    return {"--model": args.model, "--data (sha256)": data_sha256, "--method": args.method, "--freeze-layers": frozen,
            "--load-in-4bit": load_in_4bit, "--template": template, "--security-vectors (sha256)": vectors_sha256,
            "--lora-target-modules": targets if args.method == "lora" else None,
            "--prompt-field": args.prompt_field, "--response-field": args.response_field,
            "processes (torchrun --nproc_per_node)": processes,
            **{f"--{name.replace('_', '-')}": getattr(args, name) for name in HYPERPARAMETERS}}


def train_log(args, trainer, result, model, *, config, load_in_4bit, template, freeze, frozen, num_layers, targets,
              rows, examples, data_sha256, vectors_sha256, processes, checkpointing, active, vectors_unchanged,
              trainable, tokens_before, peak, resume, root):
    """train_log.json: what made the result (flags as the user gave them, data hash, versions) and how it went
    (per-step losses from the Trainer's log history, tokens/s, peak memory)."""
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    tokens = trainer.state.num_input_tokens_seen  # non-padding input tokens over all processes
    return {
        "format": LOG_FORMAT, "model": args.model, "fingerprint": safeft.model_fingerprint(config),
        "method": args.method, "load_in_4bit": load_in_4bit, "template": template,
        "freeze_layers": {k: freeze[k] for k in ("start", "end", "source")} if freeze else None,
        "frozen_layers": frozen, "security_vectors": args.security_vectors, "security_vectors_sha256": vectors_sha256,
        "security_vectors_unchanged": vectors_unchanged, "active_adapters_during_training": active,
        "data": args.data, "data_sha256": data_sha256, "rows": len(rows), "examples": len(examples),
        "data_notes": list(rows.notes),
        "hyperparameters": {**{name: getattr(args, name) for name in HYPERPARAMETERS}, "processes": processes,
                            "examples_per_step": args.micro_batch_size * args.grad_accum * processes,
                            "gradient_checkpointing": checkpointing},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "target_modules": targets,
                 "layers_to_transform": [i for i in range(num_layers) if i not in frozen] if frozen else None}
        if args.method == "lora" else None,
        "trainable_parameters": trainable, "total_parameters": sum(p.numel() for p in model.parameters()),
        "steps": trainer.state.global_step, "epochs_done": round(trainer.state.epoch or 0, 4),
        "losses": [e["loss"] for e in steps], "learning_rates": [e.get("learning_rate") for e in steps],
        "grad_norms": [e.get("grad_norm") for e in steps], "final_loss": steps[-1]["loss"] if steps else None,
        "tokens": tokens, "train_time_s": result.metrics["train_runtime"],
        "tokens_per_s": round((tokens - tokens_before) / max(result.metrics["train_runtime"], 1e-9), 2),
        "peak_memory_mb": peak[0], "peak_memory_kind": peak[1], "world_size": processes, "resumed_from": resume,
        "checkpoints": sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("checkpoint-"))
        if args.save_every and os.path.isdir(root) else [],
        "seed": args.seed, "created_at": safeft.now_iso(), "versions": safeft.library_versions(),
    }


def save_output(model, tokenizer, args, log, save_dtype):
    """The adapter (or the full model and its tokenizer) and train_log.json, committed to --out as one folder."""
    with safeft.output_dir(args.out, args.overwrite) as tmp:
        if args.method == "full":
            model.config.use_cache = True
            model.to(save_dtype).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)  # only the task adapter is left; "default" lands at the root
        check_output_clean(tmp, args.method)
        safeft.write_json_atomic(os.path.join(tmp, "train_log.json"), log)


# -- the procedure --

def finetune(args):
    """The whole run; returns the train_log dict (process 0 writes it into --out beside the result)."""
    # 1. Check everything that needs no weights: flags, output locations, data, config, tokenizer, layers, vectors.
    if args.method == "full" and args.load_in_4bit:
        raise UserError("--load-in-4bit: 4-bit weights cannot be trained directly; use --method lora (QLoRA)")
    parser = build_parser()  # its defaults tell a flag the run ignores from one left alone
    if args.method == "full":  # the log recorded a --lora-r that shaped nothing
        safeft.unused_flags(args, parser, safeft.LORA_FLAGS, "with --method full, which trains the weights themselves")
    if not args.save_every:
        safeft.unused_flags(args, parser, ["keep_checkpoints"], "without --save-every, which keeps none")
    cuda = torch.cuda.is_available()
    load_in_4bit = args.method == "lora" and (cuda if args.load_in_4bit is None else args.load_in_4bit)
    checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    args.lr = args.lr or DEFAULT_LR[args.method]
    safeft.check_output_location(args.out, args.overwrite, is_dir=True,
                                 inputs=safeft.given_paths(args, "out", "checkpoint_dir"))
    root = checkpoint_root(args)
    # The Trainer makes its folder at the start, so --out would no longer be new when the result is moved there
    # (and --overwrite would delete the checkpoints with the old --out).
    if safeft.path_within(root, args.out):
        raise UserError(f"--checkpoint-dir: {root} is --out {args.out} or inside it; give --checkpoint-dir a "
                        f"folder outside --out")
    root_existed = os.path.exists(root)  # only new checkpoints need a free folder; a file is refused either way
    safeft.check_output_location(root, args.overwrite or bool(args.resume) or not args.save_every,
                                 "--checkpoint-dir", is_dir=True)
    earlier = sorted(d for d in os.listdir(root) if d.startswith("checkpoint-")) if root_existed else []
    if args.save_every and not args.resume and earlier:  # this run's would mix with them (--resume ROOT, the log)
        raise UserError(f"--checkpoint-dir: {root} holds an earlier run's checkpoints ({', '.join(earlier[:3])}"
                        f"{', ...' if len(earlier) > 3 else ''}): continue that run with --resume {root}, or remove "
                        f"them (--overwrite replaces --out, not another run's checkpoints)")
    rows = safeft.read_rows(args.data, args.prompt_field, args.response_field, need_response=True)
    unsafe = sum(row["label"] == "unsafe" for row in rows)
    if unsafe:  # a label column picks rows in the other scripts; here a user's data trains whole, so say so
        print(f"note: --data: every row trains, also the {unsafe} labelled unsafe", file=sys.stderr)
    config = safeft.load_config(args.model)
    tokenizer, template = safeft.load_tokenizer(args.model, args.template)
    shell = safeft.meta_model(config)  # module names and layer count without weights
    num_layers = len(safeft.decoder_layers(shell))
    targets = safeft.pick_target_modules(shell, args.lora_target_modules)
    freeze, frozen = read_freeze(args.freeze_layers, num_layers, config)
    vectors = safeft.find_adapter(args.security_vectors, "--security-vectors", config, template) \
        if args.security_vectors else None
    if vectors and vectors["meta"].get("format") == LOG_FORMAT:  # vectors from elsewhere (no sv_meta.json) are fine
        raise UserError(f"--security-vectors: {args.security_vectors} is a fine-tune (finetune.py's "
                        f"train_log.json), not security vectors: give train_sv.py's output")
    if vectors and vectors["meta"].get("load_in_4bit") not in (None, load_in_4bit):
        made, now = ("4-bit", "16/32-bit") if vectors["meta"]["load_in_4bit"] else ("16/32-bit", "4-bit")
        print(f"warning: --security-vectors {args.security_vectors} were trained on the {made} base and this run "
              f"loads it in {now}: they fit the base they were trained on best (train_sv.py --load-in-4bit / "
              f"--no-load-in-4bit picks)", file=sys.stderr)
    examples = safeft.build_examples(tokenizer, rows, template, args.max_length, "--data")
    if args.train_on_inputs:  # every token is a target, the prompt's (and user turns') too, but the first: once
        # left-padded, nothing real comes before it, and a padding position would be asked to predict it
        examples = [{**e, "labels": [-100] + e["input_ids"][1:]} for e in examples]
    training_args = safeft.training_arguments(
        args, root, save_strategy="steps" if args.save_every else "no", save_steps=args.save_every or 1,
        save_total_limit=args.keep_checkpoints or None, include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if args.group_by_length else "random")
    processes, data_sha256 = training_args.world_size, safeft.sha256_file(args.data)
    vectors_sha256 = safeft.sha256_file(vectors["weights"]) if vectors else None
    settings = run_settings(args, frozen, load_in_4bit, template, targets, data_sha256, vectors_sha256, processes)
    resume = find_checkpoint(args.resume, settings, processes) if args.resume else None
    tokens_before = safeft.read_json_file(os.path.join(resume, "trainer_state.json"), "--resume").get(
        "num_input_tokens_seen", 0) if resume else 0

    # 2. Load the base model (4-bit NF4 for QLoRA) on this process's device.
    safeft.set_seed(args.seed)  # the same LoRA initialisation in every process and every resumed run
    model = safeft.load_model(args.model, load_in_4bit, device=training_args.device)
    save_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    # 3. Prepare: freeze the base, then open exactly what trains (adapters, or the base minus the frozen blocks).
    model = safeft.prepare_for_training(model, load_in_4bit, checkpointing)
    if args.method == "full":
        model.float()  # fp32 master weights; bf16 autocast does the matmuls on CUDA
    model = attach_adapters(model, args, targets, frozen, vectors)
    active = list(model.active_adapters) if vectors or args.method == "lora" else []  # a PeftModel's
    if vectors and SV_ADAPTER not in active:
        raise RuntimeError("the security vectors are not active")
    vectors_before = adapter_weights(model, SV_ADAPTER) if vectors else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # 4. Train: the Trainer checkpoints every --save-every steps and resumes from --resume.
    try:
        trainer = finetune_trainer(settings)(
            model=model, args=training_args, train_dataset=examples,
            data_collator=functools.partial(safeft.collate, pad_token_id=tokenizer.pad_token_id))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train(resume_from_checkpoint=resume)
    finally:  # the Trainer makes its folder even when no checkpoint goes there: left empty, it blocks the next run
        if training_args.process_index == 0 and not root_existed and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
    peak = safeft.peak_memory_mb(training_args.device)

    # 5. Verify: the vectors did not move. Then they leave the model.
    vectors_unchanged = None
    if vectors:
        after = adapter_weights(model, SV_ADAPTER)
        vectors_unchanged = all(torch.equal(vectors_before[n], after[n]) for n in vectors_before)
        if not vectors_unchanged:
            raise RuntimeError("the security vectors changed during training")
        model = drop_security_vectors(model, args.method)
    log = train_log(args, trainer, result, model, config=config, load_in_4bit=load_in_4bit, template=template,
                    freeze=freeze, frozen=frozen, num_layers=num_layers, targets=targets, rows=rows,
                    examples=examples, data_sha256=data_sha256, vectors_sha256=vectors_sha256, processes=processes,
                    checkpointing=checkpointing, active=active, vectors_unchanged=vectors_unchanged,
                    trainable=trainable, tokens_before=tokens_before, peak=peak, resume=resume, root=root)

    # 6. Save (process 0): the adapter or the model with train_log.json, refused if --out appeared meanwhile.
    if trainer.is_world_process_zero():
        save_output(model, tokenizer, args, log, save_dtype)
        losses = f"{log['losses'][0]:.4f} -> {log['final_loss']:.4f}" if log["losses"] else "nan -> nan"
        print(f"loss {losses} over {log['steps']} steps, {log['tokens_per_s']:.0f} tokens/s, peak memory {peak[0]} MB",
              file=sys.stderr)
        kept = f"; checkpoints in {root}" if log["checkpoints"] else ""
        events = safeft.tensorboard_folder(trainer)
        kept += f"; TensorBoard logs in {events}" if events else ""
        print(f"wrote {args.out} ({'LoRA adapter' if args.method == 'lora' else 'model'} + train_log.json){kept}")
    return log


def build_parser():
    parser = safeft.script_parser(
        "finetune.py", "Fine-tune a chat LLM (LoRA/QLoRA or full) with frozen safety layers and/or active security "
                       "vectors.")
    parser.add_argument("--data", default=safeft.repo_path(DEFAULT_DATA),
                        help="training data with prompt and response fields (JSONL, JSON, CSV/TSV, Parquet, chat)")
    parser.add_argument("--method", default="lora", choices=("lora", "full"),
                        help="lora: LoRA adapters on every linear projection (QLoRA in 4-bit); full: every weight")
    parser.add_argument("--freeze-layers", default=None,
                        help="safety_layers.json from locate_layers.py, or a range like 6-12 (0-based, inclusive): "
                             "full mode freezes those blocks' attention and MLP weights, LoRA mode puts no adapter "
                             "there")
    parser.add_argument("--security-vectors", default=None,
                        help="security-vector adapter folder from train_sv.py: active and frozen while training, "
                             "never saved")
    safeft.add_common_args(parser, DEFAULT_OUT, bound="max_steps", label_field=False)
    train = safeft.add_training_args(parser, lora_r=16, lora_alpha=32, lr=None, epochs=1, micro_batch_size=4,
                                     grad_accum=1, warmup_ratio=0.05, lr_unset=", ".join(
                                         f"{lr:g} with --method {method}" for method, lr in DEFAULT_LR.items()))
    train.add_argument("--train-on-inputs", action="store_true", help="also compute the loss on prompt tokens")
    train.add_argument("--group-by-length", default=True, action=argparse.BooleanOptionalAction,
                       help="batch examples of similar length together (less padding)")
    ckpt = parser.add_argument_group("checkpoints (the Trainer's)")
    ckpt.add_argument("--save-every", type=safeft.non_negative_int, default=0,
                      help="write a checkpoint every N optimizer steps (0 = never)")
    ckpt.add_argument("--checkpoint-dir", default=None, help="where checkpoints go; unset = <out>-checkpoints")
    ckpt.add_argument("--keep-checkpoints", type=safeft.non_negative_int, default=2,
                      help="keep only the newest N checkpoints (0 = all)")
    ckpt.add_argument("--resume", default=None,
                      help="checkpoint folder (e.g. runs/finetune-checkpoints/checkpoint-50), or a checkpoint "
                           "folder's parent for its newest; every other flag must repeat the interrupted run")
    return parser


def main(argv=None):
    argv = safeft.command_line(argv)  # the resume hint repeats it
    return safeft.run_main(finetune, build_parser(), argv, resume_hint=lambda args: resume_hint(args, argv))


if __name__ == "__main__":
    main()
