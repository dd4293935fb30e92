"""train_sv.py: train security vectors, a small LoRA adapter that makes harmful behaviour unlearnable.

Security vectors (Zhou et al., "Making Harmful Behaviors Unlearnable for Large Language Models",
arXiv 2311.02105) are a few extra parameters, separable from the model, trained on ~100 harmful
prompt -> response pairs so that, while they are active, the model already produces the harmful
responses. finetune.py keeps them active and frozen while it fine-tunes on user data: harmful examples
then have almost no prediction error, so they carry almost no gradient into the trained weights. At
inference the vectors are dropped.

Here the vectors are a PEFT LoRA adapter named "security_vectors" on every linear projection of the decoder
blocks, trained with the base frozen and the loss on response tokens only (safeft's ResponseOnlyTrainer, a
transformers Trainer). --keep-data / --keep-weight add keep-weight x KL(P_base || P_base+vectors) on benign
prompts, so the vectors change the model as little as possible outside harmful requests. A check at the end
compares the response loss with the vectors active and inactive, and the refusals on held-out harmful
prompts with and without them.

Output (--out, default runs/security_vectors): adapter_config.json + adapter_model.safetensors at the root of
the folder (PeftModel.from_pretrained(base, out) loads it) and sv_meta.json (what made it: model, fingerprint,
data file and sha256, settings, loss per step, the check).

Examples:
  python train_sv.py                                    # aligned default model, data/harmful_train.jsonl
  python train_sv.py --model smollm2 --max-steps 5 --out /tmp/sv          # quick run
  python train_sv.py --model meta-llama/Llama-2-7b-chat-hf --load-in-4bit --out runs/sv-llama2
  python train_sv.py --keep-data data/normal.jsonl --keep-weight 1.0 --out runs/sv-keep
  python train_sv.py --resume runs/security_vectors --epochs 1 --out runs/sv-more
  torchrun --nproc-per-node 2 train_sv.py --out runs/sv-ddp              # several GPUs: the Trainer's DDP
"""
import os
import sys
import tempfile
import time

import torch

import safeft
from safeft import SV_ADAPTER, UserError

SV_FORMAT = "security-vectors/v1"  # the format of sv_meta.json, which finetune.py and evaluate.py check

# -- defaults: small enough that the embedded models train in minutes on a laptop CPU, and the usual
# QLoRA-style choices for a 7B chat model on one GPU --
DEFAULT_DATA = "data/harmful_train.jsonl"  # harmful requests with compliant openings, no operational detail
DEFAULT_CHECK_DATA = "data/harmful_eval.jsonl"  # held out from DEFAULT_DATA
DEFAULT_OUT = "runs/security_vectors"
LORA_R = 8  # ~100 short pairs need few parameters; the paper's vectors are small
LORA_ALPHA = 16  # update scale alpha / r = 2, the usual LoRA choice
LR = 1e-3  # high for LoRA: the vectors must fit their few rows closely (low loss = little gradient later)
EPOCHS = 2  # enough for ~100 rows to reach a low response loss at this learning rate
MICRO_BATCH_SIZE = 4
GRAD_ACCUM = 2  # 8 examples per optimizer step
WARMUP_RATIO = 0.1
KEEP_WEIGHT = 1.0  # the KL weight once --keep-data is given: the two terms start at similar sizes
CHECK_LIMIT = 32  # rows of --data and of --check-data the check uses: a fast, still readable count
# Tokens per answer in the refusal check. A refusal shows in its first few tokens, but a compliant answer
# needs room past its one-line opening ("Sure, here is ...") for a reader to see whether content follows;
# 64 tokens is a short paragraph, and 2 x 32 answers of it stay a minute or two on a CPU for a 0.5B model.
CHECK_MAX_NEW_TOKENS = 64
EVAL_BATCH_SIZE = 16  # no-gradient passes (the check) hold no activations for backward, so larger batches fit


def keep_examples(tokenizer, rows, template, max_length):
    """Benign sequences for the KL term: the whole exchange when a row has an answer, else the formatted prompt.
    Only input_ids matter (the KL covers every real token); labels are there for collate()."""
    examples = []
    for row in rows:
        if row.get("response") or row.get("messages"):
            ids = safeft.build_example(tokenizer, row, template, max_length, train_on_inputs=True)["input_ids"]
        else:
            text = safeft.format_prompt(tokenizer, row, template)
            ids = tokenizer(text, add_special_tokens=(template != "chat"))["input_ids"][:max_length]
        examples.append({"input_ids": ids, "labels": [-100] * len(ids)})
    return examples


class KeepCollator:
    """collate() of the training rows, plus (with --keep-data) a batch of as many benign rows as keep_* keys.
    The benign rows come from a shuffled cycle seeded by --seed and the process index, so a rerun draws the
    same pairs and two processes draw different ones."""

    def __init__(self, pad_token_id, keep, seed):
        self.pad_token_id, self.keep, self.order = pad_token_id, keep, []
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples):
        batch = safeft.collate(examples, self.pad_token_id)
        if self.keep:
            n = min(len(examples), len(self.keep))
            while len(self.order) < n:
                self.order += torch.randperm(len(self.keep), generator=self.generator).tolist()
            picked, self.order = self.order[:n], self.order[n:]
            keep = safeft.collate([self.keep[i] for i in picked], self.pad_token_id)
            batch.update({f"keep_{k}": v for k, v in keep.items() if k != "labels"})
        return batch


def keep_kl(peft_model, keep, forward=None):
    """Mean over real tokens of KL(P_base || P_base+vectors) on next-token distributions. The reference is the
    base (adapter disabled, no gradient); this direction penalises the vectors for taking probability away
    from what the base expects, which is what "leave benign behaviour alone" asks. `forward` is the model
    the Trainer wraps (DDP), so that the gradient is synchronised."""
    with torch.no_grad(), peft_model.disable_adapter():
        reference = peft_model(**keep, use_cache=False).logits.float().log_softmax(-1)
    current = (forward or peft_model)(**keep, use_cache=False).logits.float().log_softmax(-1)
    kl = torch.nn.functional.kl_div(current, reference, log_target=True, reduction="none").sum(-1)
    return kl[keep["attention_mask"].bool()].mean()


def vector_trainer_class():
    """safeft's ResponseOnlyTrainer plus the KL term; it logs each optimizer step's response loss and KL."""

    class SecurityVectorTrainer(safeft.trainer_class()):
        def __init__(self, *args, keep_weight=0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.keep_weight = keep_weight
            self.step_sums = torch.zeros(2)  # this optimizer step's response loss and KL, summed over micro-batches

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            keep = {k[len("keep_"):]: inputs.pop(k) for k in list(inputs) if k.startswith("keep_")}
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            accum = self.current_gradient_accumulation_steps
            # Normalised by num_items_in_batch the response loss is already a share of the step's mean; otherwise
            # the Trainer divides what we return by the accumulation steps, and the KL must follow the same rule.
            divided_later = accum if num_items_in_batch is None else 1
            kl = keep_kl(self.accelerator.unwrap_model(model), keep, model) if keep else torch.zeros(())
            self.step_sums += torch.tensor([loss.item() / divided_later, kl.item() / accum])
            return loss + self.keep_weight * kl * (divided_later / accum) if keep else loss

        def log(self, logs, start_time=None):
            if "loss" in logs:  # one entry per optimizer step (logging_steps=1); the mean over processes
                sums = self.accelerator.gather(self.step_sums.to(self.args.device)).view(-1, 2).mean(0)
                logs["response_loss"] = sums[0].item()
                if self.keep_weight:
                    logs["keep_kl"] = sums[1].item()
                self.step_sums.zero_()
            super().log(logs, start_time)

    return SecurityVectorTrainer


def attach_security_vectors(model, args, target_modules, resume=None):
    """The prepared (frozen) base wrapped in a PeftModel whose only trainable weights are the security vectors:
    new ones on target_modules, or find_adapter's `resume` with their own rank, alpha and targets."""
    from peft import get_peft_model
    if resume:
        return safeft.load_adapter(model, resume, SV_ADAPTER, "--resume", trainable=True)
    return get_peft_model(model, safeft.lora_config(args, target_modules), adapter_name=SV_ADAPTER)


def adapter_settings(peft_model, target_modules):
    config = peft_model.peft_config[SV_ADAPTER]
    # PEFT keeps a set; the discovered order reads better and is what the flag would take.
    targets = list(target_modules) if target_modules else sorted(config.target_modules)
    return {"lora_r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "lora_target_modules": targets}


def train_vectors(peft_model, examples, keep, args, training_args, keep_weight, pad_token_id, output_dir):
    """Trains the vectors with the Trainer -> {"losses", "keep_kl", "lrs", "steps", "warmup_steps", "world_size",
    "tensorboard_logs"}."""
    training_args.output_dir = output_dir
    trainer = vector_trainer_class()(
        model=peft_model, args=training_args, train_dataset=examples, keep_weight=keep_weight,
        data_collator=KeepCollator(pad_token_id, keep, seed=args.seed + training_args.process_index))
    trainer.train()
    peft_model.eval()
    steps = [h for h in trainer.state.log_history if "response_loss" in h]
    # TensorBoard writes into output_dir, the temporary folder that becomes --out, so its path is kept relative to
    # that; TENSORBOARD_LOGGING_DIR may put it elsewhere, and then the path stays as it is.
    events, root = safeft.tensorboard_folder(trainer), os.path.abspath(output_dir)
    if events and os.path.commonpath([os.path.abspath(events), root]) == root:
        events = os.path.relpath(events, root)
    return {"tensorboard_logs": events,
            "losses": [h["response_loss"] for h in steps], "lrs": [h["learning_rate"] for h in steps],
            "keep_kl": [h["keep_kl"] for h in steps] if keep_weight else None,
            "steps": trainer.state.global_step, "world_size": training_args.world_size,
            "warmup_steps": training_args.get_warmup_steps(trainer.state.max_steps)}


def keep_kl_sum(peft_model, batch):
    """(keep_kl summed over the batch's real tokens, their number), for safeft.token_mean."""
    keep = {k: v for k, v in batch.items() if k != "labels"}
    tokens = int(keep["attention_mask"].sum())
    return keep_kl(peft_model, keep) * tokens, tokens


def heldout_examples(tokenizer, check_rows, template, max_length):
    """The check's held-out rows with a response that keep an answer token, as labelled examples. Built before
    training: a row the template cannot render is an error then, not after the vectors were trained."""
    examples = [safeft.build_example(tokenizer, r, template, max_length) for r in check_rows if r.get("response")]
    return [e for e in examples if any(label != -100 for label in e["labels"][1:])]


def run_check(peft_model, tokenizer, template, train_examples, check_rows, heldout, args, phrases, keep=None):
    """Response loss with the vectors active vs inactive (training rows, and heldout: heldout_examples of
    check_rows), and greedy answers to the held-out harmful prompts with and without the vectors, each with its
    refusal verdict."""
    peft_model.eval()
    pad, size = tokenizer.pad_token_id, args.eval_batch_size

    def mean_response_loss(examples):  # the number the vectors' "consistency" is about
        return safeft.token_mean(peft_model, safeft.response_loss_sum, examples, pad, size)[0]

    check = {"train_rows": len(train_examples), "train_loss_active": mean_response_loss(train_examples)}
    with peft_model.disable_adapter():
        check["train_loss_inactive"] = mean_response_loss(train_examples)
    if heldout:
        check.update(heldout_loss_rows=len(heldout), heldout_loss_active=mean_response_loss(heldout))
        with peft_model.disable_adapter():
            check["heldout_loss_inactive"] = mean_response_loss(heldout)
    if check_rows:
        generate = lambda desc: safeft.generate_greedy(  # noqa: E731
            peft_model, tokenizer, check_rows, template, args.check_max_new_tokens, size, desc=desc)
        with_vectors = generate("check: with vectors")
        with peft_model.disable_adapter():
            without_vectors = generate("check: without vectors")
        answers = [{"prompt": row["prompt"], "with_vectors": on, "refused_with": safeft.is_refusal(on, phrases),
                    "without_vectors": off, "refused_without": safeft.is_refusal(off, phrases)}
                   for row, on, off in zip(check_rows, with_vectors, without_vectors)]
        check.update({"prompts": len(answers), "max_new_tokens": args.check_max_new_tokens,
                      "refusals_with_vectors": sum(a["refused_with"] for a in answers),
                      "refusals_without_vectors": sum(a["refused_without"] for a in answers),
                      "answers": answers})  # every answer and verdict, so a reader can check them
    if keep:
        check["keep_rows"] = len(keep[:args.check_limit])
        check["keep_kl"] = safeft.token_mean(peft_model, keep_kl_sum, keep[:args.check_limit], pad, size)[0]
    return check


def save_vectors(peft_model, folder, meta):
    """The adapter at the ROOT of folder (PEFT puts an adapter not named "default" in folder/<name>/) and
    sv_meta.json. folder is safeft.output_dir's temporary folder, so nothing is in place until all is written."""
    peft_model.save_pretrained(folder, selected_adapters=[SV_ADAPTER])
    nested = os.path.join(folder, SV_ADAPTER)
    if os.path.isdir(nested):
        for name in os.listdir(nested):
            os.replace(os.path.join(nested, name), os.path.join(folder, name))
        os.rmdir(nested)
    if os.path.isfile(os.path.join(folder, "README.md")):
        os.remove(os.path.join(folder, "README.md"))  # PEFT's blank model card; sv_meta.json says what made this
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise RuntimeError(f"PEFT did not write {name}")
    safeft.write_json_atomic(os.path.join(folder, "sv_meta.json"), meta)


def run(args):
    started, timing = time.time(), {}
    # 1. Check every input before the weights load: output, data, resume, target modules, template, the examples
    # (the check's too: one the template cannot render is found now, not after training).
    if args.keep_weight is not None and not args.keep_data:
        raise UserError("--keep-weight needs --keep-data (the benign prompts the KL term is computed on)")
    parser = build_parser()  # its defaults tell a flag the run ignores from one left alone
    if args.resume:  # the vectors continue as their adapter was made: its rank, alpha, dropout and targets
        safeft.unused_flags(args, parser, safeft.LORA_FLAGS, "with --resume, which continues the vectors' own adapter")
    if not args.check_limit:
        safeft.unused_flags(args, parser, ["check_data", "check_max_new_tokens", "eval_batch_size"],
                            "with --check-limit 0, which runs no check")
    # --resume may be --out: its vectors are read before the new ones replace them
    inputs = safeft.given_paths(args, "out", "resume")
    safeft.check_output_location(args.out, args.overwrite, is_dir=True, inputs=inputs)
    # A label column (XSTest style) picks the rows: harmful ones to learn and to check, benign ones to keep.
    fields = dict(prompt_field=args.prompt_field, response_field=args.response_field, label_field=args.label_field)
    rows = safeft.read_rows(args.data, need_response=True, flag="--data", label="unsafe", **fields)
    keep_rows = safeft.read_rows(args.keep_data, flag="--keep-data", label="safe", **fields) if args.keep_data else None
    check_path = os.path.abspath(args.check_data) if args.check_limit else None
    check_rows = (safeft.read_rows(check_path, limit=args.check_limit, flag="--check-data", label="unsafe", **fields)
                  if check_path else [])
    phrases = safeft.load_refusal_phrases(args.refusal_phrases)
    config = safeft.load_config(args.model)
    resume = safeft.find_adapter(  # the vectors to continue, checked before the weights load
        args.resume, "--resume", config, made_by=(SV_FORMAT, "sv_meta.json (not a train_sv.py output)")) \
        if args.resume else None
    target_modules = None if resume else safeft.pick_target_modules(safeft.meta_model(config),
                                                                    args.lora_target_modules)
    tokenizer, template = safeft.load_tokenizer(args.model, args.template)
    safeft.check_template_fits(template, rows, keep_rows, check_rows)
    examples = safeft.build_examples(tokenizer, rows, template, args.max_length, "--data")
    heldout = heldout_examples(tokenizer, check_rows, template, args.max_length)
    keep = keep_examples(tokenizer, keep_rows, template, args.max_length) if keep_rows else None
    keep_weight = (KEEP_WEIGHT if args.keep_weight is None else args.keep_weight) if keep else 0.0
    on_cuda = torch.cuda.is_available()
    load_in_4bit = on_cuda if args.load_in_4bit is None else args.load_in_4bit
    checkpointing = on_cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only process 0 checks and saves
    say = print if main_process else (lambda *a, **k: None)

    # 2. Load the base and wrap it: frozen (the one QLoRA recipe), with the vectors as its only trainable weights.
    t0 = time.time()
    safeft.set_seed(args.seed)
    # On this process's device as the Trainer picks it (under torchrun, GPU LOCAL_RANK): loaded onto plain "cuda",
    # every process's copy went to GPU 0 first. The Trainer's output folder is set once it exists.
    training_args = safeft.training_arguments(args, None)
    model = safeft.load_model(args.model, load_in_4bit, device=training_args.device)
    model = safeft.prepare_for_training(model, load_in_4bit, checkpointing)
    safeft.set_seed(args.seed)  # LoRA initialisation depends only on --seed
    peft_model = attach_security_vectors(model, args, target_modules, resume)
    settings = adapter_settings(peft_model, target_modules)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    timing["load"] = round(time.time() - t0, 2)
    if resume:
        say(f"resuming {args.resume}: rank {settings['lora_r']}, alpha {settings['lora_alpha']}, targets "
            f"{', '.join(settings['lora_target_modules'])} (from the adapter, not the flags)", file=sys.stderr)
    say(f"training security vectors: {len(examples)} rows of {args.data}, rank {settings['lora_r']}, "
        f"{trainable:,} trainable parameters, template {template}, {'4-bit NF4' if load_in_4bit else 'unquantised'} "
        f"base", file=sys.stderr)

    # The output is written into a temporary folder beside --out and renamed into place only when complete.
    place = safeft.output_dir(args.out, args.overwrite) if main_process else tempfile.TemporaryDirectory()
    with place as folder:
        # 3. Train (the Trainer's scratch output goes into the same temporary folder).
        t0 = time.time()
        log = train_vectors(peft_model, examples, keep, args, training_args, keep_weight, tokenizer.pad_token_id,
                            folder)
        timing["train"] = round(time.time() - t0, 2)
        if not main_process:
            return None

        # 4. Verify: do the vectors make the harmful responses likely, and do they change refusals?
        t0 = time.time()
        check = None
        if args.check_limit:
            check = run_check(peft_model, tokenizer, template, examples[:args.check_limit], check_rows, heldout,
                              args, phrases, keep)
            check.update({"check_data": check_path, "check_data_sha256": safeft.sha256_file(check_path)})
        timing["check"] = round(time.time() - t0, 2)

        # 5. Save the adapter and what made it.
        peak_mb, peak_kind = safeft.peak_memory_mb()
        meta = {
            "format": SV_FORMAT, "model": args.model,
            "fingerprint": safeft.model_fingerprint(config), "load_in_4bit": load_in_4bit, "template": template,
            "adapter_name": SV_ADAPTER, "data": args.data, "data_sha256": safeft.sha256_file(args.data),
            "rows": len(examples), "rows_skipped": len(rows) - len(examples),
            "data_notes": [*rows.notes, *(keep_rows.notes if keep_rows else []), *getattr(check_rows, "notes", [])],
            "trainable_parameters": trainable,
            "hyperparameters": {
                # settings after the flags: on --resume the lora_* are the adapter's, not the flags'
                **{name: getattr(args, name) for name in safeft.TRAINING_FLAGS}, **settings,
                "world_size": log["world_size"], "warmup_steps": log["warmup_steps"],
                "examples_per_step": args.micro_batch_size * args.grad_accum * log["world_size"],
                "gradient_checkpointing": checkpointing, "optimizer": "AdamW (transformers Trainer)",
                "loss": "mean NLL of response tokens", "keep_data": args.keep_data,
                "keep_data_sha256": safeft.sha256_file(args.keep_data) if args.keep_data else None,
                "keep_weight": keep_weight, "keep_kl_direction": "KL(P_base || P_base+vectors)" if keep else None,
            },
            "steps": log["steps"], "losses": log["losses"], "keep_kl": log["keep_kl"], "lrs": log["lrs"],
            "final_loss": log["losses"][-1] if log["losses"] else None, "check": check,
            "tensorboard_logs": log["tensorboard_logs"],
            "resumed_from": ({"dir": args.resume, "steps": resume["meta"].get("steps"),
                              "final_loss": resume["meta"].get("final_loss")} if resume else None),
            "seed": args.seed, "wall_time_s": round(time.time() - started, 2), "timing_s": timing,
            "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind,
            "device": str(next(peft_model.parameters()).device), "created_at": safeft.now_iso(),
            "versions": safeft.library_versions(),
        }
        save_vectors(peft_model, folder, meta)
    print_summary(meta, args.out)
    return meta


def print_summary(meta, out):
    losses, check = meta["losses"], meta["check"] or {}
    if losses:
        print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    if check:
        print(f"check: response loss on {check['train_rows']} training rows {check['train_loss_active']:.4f} "
              f"with the vectors, {check['train_loss_inactive']:.4f} without")
    if "heldout_loss_active" in check:
        print(f"check: response loss on {check['heldout_loss_rows']} held-out pairs {check['heldout_loss_active']:.4f} "
              f"with the vectors, {check['heldout_loss_inactive']:.4f} without")
    if "prompts" in check:
        print(f"check: refusals on {check['prompts']} held-out harmful prompts ({check['max_new_tokens']} tokens "
              f"each): {check['refusals_with_vectors']} with the vectors, {check['refusals_without_vectors']} without")
    if check:
        print(f"check: held-out set {check['check_data']}; every answer is in sv_meta.json")
    if check.get("keep_kl") is not None:
        print(f"check: KL(base || base+vectors) on {check['keep_rows']} keep rows {check['keep_kl']:.4f}")
    print(f"wall time {meta['wall_time_s']:.0f} s, peak memory {meta['peak_memory_mb']} MB")
    print(f"wrote {os.path.join(out, 'adapter_model.safetensors')} and {os.path.join(out, 'sv_meta.json')}"
          + (f"; TensorBoard logs in {os.path.join(out, meta['tensorboard_logs'])}" if meta.get("tensorboard_logs")
             else ""))


def build_parser():
    parser = safeft.script_parser(
        "train_sv.py", "Train security vectors (Zhou et al., arXiv 2311.02105): a LoRA adapter that makes the model "
                       "produce the harmful responses while active, for finetune.py to keep active and frozen.")
    parser.add_argument("--data", default=safeft.repo_path(DEFAULT_DATA),
                        help="harmful prompt -> response pairs the vectors learn (needs responses); the default is "
                             "the copy beside this script")
    parser.add_argument("--keep-data", default=None,
                        help="benign prompts (e.g. data/normal.jsonl) on which the vectors should not change the "
                             "model: adds keep-weight x KL(P_base || P_base+vectors) to the loss; off when unset")
    parser.add_argument("--keep-weight", type=safeft.non_negative_float, default=None,
                        help=f"weight of the KL term (needs --keep-data; {KEEP_WEIGHT} when it is given)")
    parser.add_argument("--resume", default=None,
                        help="continue training the security vectors in this folder (their rank, alpha, dropout and "
                             "target modules are kept; the optimizer starts afresh)")
    check = parser.add_argument_group("the check at the end")
    check.add_argument("--check-data", default=safeft.repo_path(DEFAULT_CHECK_DATA),
                       help="held-out harmful prompts (responses optional) for the check; the default is the copy "
                            "beside this script, whatever the current folder holds")
    check.add_argument("--check-limit", type=safeft.non_negative_int, default=CHECK_LIMIT,
                       help="the check uses the first N rows of --data and of --check-data (0 = no check)")
    check.add_argument("--check-max-new-tokens", type=safeft.positive_int, default=CHECK_MAX_NEW_TOKENS,
                       help="greedy tokens per answer in the refusal check (room to see whether content follows)")
    check.add_argument("--eval-batch-size", type=safeft.positive_int, default=EVAL_BATCH_SIZE,
                       help="batch size of the check's no-gradient passes")
    safeft.add_refusal_phrases_arg(check)
    safeft.add_common_args(parser, DEFAULT_OUT, bound="max_steps")
    safeft.add_training_args(parser, lora_r=LORA_R, lora_alpha=LORA_ALPHA, lr=LR, epochs=EPOCHS,
                             micro_batch_size=MICRO_BATCH_SIZE, grad_accum=GRAD_ACCUM, warmup_ratio=WARMUP_RATIO)
    return parser


def main(argv=None):
    return safeft.run_main(run, build_parser(), argv, resume_hint=lambda args: (
        f"nothing was written to {args.out} (the vectors are saved at the end); rerun the command"))


if __name__ == "__main__":
    main()
