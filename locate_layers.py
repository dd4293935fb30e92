"""locate_layers.py: find the safety layers of an aligned chat LLM (Li et al., "Safety Layers in Aligned Large
Language Models", ICLR 2025, arXiv 2408.17003, section 3), for any Hugging Face causal LM.

Stage 1, the initial range: every normal and malicious prompt is forwarded once and each decoder block's raw output
read at its last token. Random pairs per type (normal-normal NN, normal-malicious NM, malicious-malicious MM) give
each layer's cosine statistics and the angle gap = angle(NM) - angle(NN); the range runs from where the gap rises
clearly above the early-layer noise to where that rise ends (INITIAL_RANGE_RULE, also in --help and the JSON).

Stage 2, the bounds (section 3.4): the projections of a candidate range of blocks are scaled by --scale (forward
hooks; the weights stay untouched), the over-rejection prompts are continued greedily and the refusals counted. With
the start fixed the end moves over +-k layers (--search-radius); while the best count sits at an edge of the ends
tried, the end moves on that way, one layer at a time, until the best is interior (a worse count on both sides), the
model's first/last layer is reached or --max-extra-passes is spent. Then the start moves the same way. Scale > 1
keeps the most refusals, < 1 the fewest; --scale auto picks the direction from the unscaled model's refusals and
steps the factor until the start's sweep is clear (permutation p < 0.05). Each candidate costs one generation pass over
the over-rejection prompts; the JSON records every candidate, each sweep's outcome and the cost.

Outputs: safety_layers.json (safety-layers/v1; docs/qwen-coder-0.5b_safety_layers.json is one), a .png of the
curves and sweeps, and the same freeze for other trainers: <stem>.peft.json (LoraConfig(**json): LoRA on every
layer but the safety layers), <stem>.axolotl.yaml (unfrozen_parameters) and <stem>.freeze.json (the parameters
to freeze in a full fine-tune).

    python locate_layers.py                                           # the aligned embedded model, data/ sets
    python locate_layers.py --model smollm2 --limit 60 --scale 1.2    # a quick run (minutes on a laptop CPU)
    python locate_layers.py --model Qwen/Qwen2.5-1.5B-Instruct --template alpaca --out runs/qwen/safety_layers.json
    python locate_layers.py --skip-scaling --pairs 200                # stage 1 only
    (notebook)  from locate_layers import main; main(["--limit", "60", "--scale", "1.2"])
"""
import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import textwrap
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import safeft
from safeft import UserError

DEFAULT_NORMAL = safeft.repo_path("data/normal.jsonl")
DEFAULT_MALICIOUS = safeft.repo_path("data/harmful_train.jsonl")
DEFAULT_OVER_REJECTION = safeft.repo_path("data/over_rejection.jsonl")
DEFAULT_OUT = "runs/safety_layers.json"
PAIRS = 500              # pairs per type, as in the paper
BOOTSTRAP = 1000         # resamples of the prompts behind every 95% interval of the gap
MIN_PROMPTS = 4          # distinct prompts per stage-1 set: fewer give at most 3 normal-normal pairs, no statistics
SEARCH_RADIUS = 3        # the first window: each bound moves up to 3 layers either way
MAX_EXTRA_PASSES = 8     # candidates a sweep may add beyond its first window while its best sits at an edge
SCALE_STEP = 0.05        # --scale auto tries 1 +- 0.05 n (the paper used 1.2 and 0.8) ...
MAX_SCALE_STEPS = 4      # ... for n = 1..4
MAX_NEW_TOKENS = 16      # as the paper's code: room for "As an AI language model, I cannot" (8 cut it)
BATCH_SIZE = 32          # prompts per forward pass
CLEAR_P = 0.05           # "clear" for --scale auto: a permutation test of the start candidates' spread ...
PERMUTATIONS = 10000     # ... with this many shuffles (its p is then within about 0.005 of the exact one at 0.05)
HIDDEN_STATES = ("raw output of each decoder block (forward hooks on decoder_layers(model)[i]; the last layer "
                 "without the final norm), at the last prompt token; embedding output skipped")
INITIAL_RANGE_RULE = ("95% intervals from a bootstrap over the prompts (each pair weighted by how often both "
                      "its prompts were drawn); early layers = the first max(2, round(K/10)); "
                      "threshold = their highest upper bound (noise) + their widest interval (margin); start = the "
                      "first later layer whose lower bound exceeds the threshold, as does the next layer's or the one "
                      "after it (one noisy layer tolerated); from start the range steps on while the next layer's gap "
                      "is clearly higher (the step's lower 95% bound > 0) or, past one noisy step, the layer after it "
                      "is clearly higher; end = the largest gap on that rising stretch (its peak, or the first layer "
                      "of its plateau). No start, or a rise up to the last layer = no clear range")


# -- prompts as token ids; the prefix they all share (system prompt, template preamble) runs once --

def tokenize_prompts(tokenizer, rows, template):
    """Unpadded token ids of each formatted prompt: the ids encode_prompts() gives, without the padding."""
    texts = [safeft.format_prompt(tokenizer, row, template) for row in rows]
    return tokenizer(texts, add_special_tokens=(template != "chat"))["input_ids"]


def shared_prefix_length(id_lists):
    """How many leading tokens all prompts share, keeping at least one token of each prompt after it."""
    first, n = id_lists[0], 0
    while n < min(map(len, id_lists)) - 1 and all(ids[n] == first[n] for ids in id_lists):
        n += 1
    return n


def forward_keywords(model):
    """(key/value cache keyword, head keywords) of this model's forward: transformers 5.24 renamed past_key_values to
    cache (the old name goes in 5.40; 5.0-5.23 know only it); the LM head over every position is wasted work here."""
    return ("cache" if safeft.forward_accepts(model, "cache") else "past_key_values",
            {"logits_to_keep": 1} if safeft.forward_accepts(model, "logits_to_keep") else {})


def cache_of(output):
    return output["cache"] if "cache" in output else output.past_key_values


@torch.no_grad()
def forward_batches(model, id_lists, pad_id, batch_size, prefix_len=0, keep_cache=True, desc=None):
    """Forwards the prompts left-padded in batches of similar lengths (less padding), yielding (prompt indices,
    output, attention_mask, position_ids) per batch. With prefix_len (shared_prefix_length()) the prefix runs once
    and each batch only the tokens after it, from a copy of the prefix's key/value cache."""
    keyword, head = forward_keywords(model)
    if prefix_len:
        ids = torch.tensor([id_lists[0][:prefix_len]], dtype=torch.long, device=model.device)
        prefix_cache = cache_of(model(input_ids=ids, use_cache=True, **head))
    order = sorted(range(len(id_lists)), key=lambda i: len(id_lists[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=desc is None):
        chunk = order[start:start + batch_size]
        suffixes = [id_lists[i][prefix_len:] for i in chunk]
        width = max(map(len, suffixes))
        input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in suffixes], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=model.device)
        # Positions count real tokens only, as generate() does, so padding never shifts a prompt.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) + prefix_len
        extra = {}
        if prefix_len:
            extra[keyword] = copy.deepcopy(prefix_cache)  # the forward appends to it; every batch reuses the prefix
            extra[keyword].batch_repeat_interleave(len(chunk))
            attention_mask = torch.cat([attention_mask.new_ones((len(chunk), prefix_len)), attention_mask], dim=1)
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=keep_cache or bool(prefix_len), **extra, **head)
        yield chunk, output, attention_mask, position_ids


def prefix_sharing_works(model, id_lists, pad_id):
    """(ok, why): the shared-prefix path against a plain batched forward on a few prompts' next-token logits, so
    that a model whose cache does not share this way is run in full rather than given wrong hidden states."""
    prefix_len = shared_prefix_length(id_lists)
    if prefix_len == 0:
        return False, "the prompts share no token prefix"
    probe = 4  # a cache that does not share misses by whole logits: a few prompts show it
    sample = sorted(id_lists, key=len)[:: max(1, len(id_lists) // probe)][:probe]  # mixed lengths: padding matters
    try:
        shared = next(forward_batches(model, sample, pad_id, probe, prefix_len))[1].logits[:, -1].float()
    except Exception as e:  # a cache that cannot be copied or repeated this way: run every prompt in full, say why
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    plain = next(forward_batches(model, sample, pad_id, probe, keep_cache=False))[1].logits[:, -1].float()
    diff = (shared - plain).abs().max().item()
    # A 4-bit model reports float32 but bitsandbytes computes it in bf16 on the GPU and on CPUs with AVX512-BF16,
    # where even a plain forward moves by ~0.3 logits with the batch's padding: it gets the half-precision bound.
    # A cache that does not share this way misses by whole logits, so either bound still catches it.
    exact = model.dtype == torch.float32 and not getattr(model, "is_loaded_in_4bit", False)
    if diff > (1e-4 if exact else 3e-2) * (1 + plain.abs().max().item()):
        return False, f"shared-prefix logits differ from a plain forward by {diff:.3g}"
    return True, f"{prefix_len} shared prefix tokens run once"


# -- stage 1: last-token hidden states, their cosines, the initial range --

@contextlib.contextmanager
def capture_last_token(blocks):
    """Collects each block's raw output at the last position of every forward while active."""
    captured, index = [[] for _ in blocks], {block: i for i, block in enumerate(blocks)}

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output  # some blocks return a tuple
        captured[index[module]].append(hidden[:, -1, :].detach().float().cpu())

    with contextlib.ExitStack() as hooks:  # removed however the body ends
        for block in blocks:
            hooks.enter_context(block.register_forward_hook(hook))
        yield captured


@torch.no_grad()
def last_token_states(model, tokenizer, rows, template, batch_size, share_prefix=True):
    """float32 [prompts, K, hidden]: every block's raw output at each prompt's last token (left padding puts it in
    the last column)."""
    id_lists = tokenize_prompts(tokenizer, rows, template)
    prefix_len, states = shared_prefix_length(id_lists) if share_prefix else 0, [None] * len(rows)
    with capture_last_token(safeft.decoder_layers(model)) as captured:  # [-1]: the latest batch (the prefix ran first)
        for chunk, *_ in forward_batches(model, id_lists, tokenizer.pad_token_id, batch_size, prefix_len, False,
                                         "hidden states"):
            for i, state in zip(chunk, torch.stack([c[-1] for c in captured], dim=1).numpy()):
                states[i] = state
    return np.stack(states).astype(np.float32)


def sample_pairs(n_first, n_second, count, rng, same_set):
    """count distinct random pairs (i, j), i from the first set and j from the second; within one set unordered
    pairs of two different prompts (i < j). Every possible pair when there are no more than count."""
    total = n_first * (n_first - 1) // 2 if same_set else n_first * n_second
    flat = np.arange(total) if total <= count else np.sort(rng.choice(total, size=count, replace=False))
    if not same_set:
        return np.divmod(flat, n_second)
    starts = np.concatenate([[0], np.cumsum(np.arange(n_first - 1, 0, -1))])  # flat index of pair (i, i + 1)
    first = np.searchsorted(starts, flat, side="right") - 1
    return first, first + 1 + (flat - starts[first])


def pair_cosines(states_first, states_second, first, second):
    """[pairs, K] cosines of states_first[first[p]] and states_second[second[p]] at every layer (in float64)."""
    unit = [rows / np.linalg.norm(rows, axis=-1, keepdims=True)
            for rows in (states_first[first].astype(np.float64), states_second[second].astype(np.float64))]
    return np.clip(np.einsum("pkh,pkh->pk", *unit), -1.0, 1.0)


def cosine_statistics(normal_states, malicious_states, pairs, seed, resamples=BOOTSTRAP):
    """Per-layer cosine mean ("nn", "nm", "mm") and std ("nn_std", ...) of the three pair types, their mean angle
    ("angle_nn_deg", ...), the angle gap NM - NN in degrees and [resamples, K] bootstrap gaps."""
    rng, states = np.random.default_rng(seed), {"n": normal_states, "m": malicious_states}
    index = {kind: sample_pairs(len(states[kind[0]]), len(states[kind[1]]), pairs, rng, kind[0] == kind[1])
             for kind in ("nn", "nm", "mm")}
    cosines = {kind: pair_cosines(states[kind[0]], states[kind[1]], *index[kind]) for kind in index}
    angles = {kind: np.degrees(np.arccos(c)) for kind, c in cosines.items()}
    # The prompts are resampled, not the pairs: a prompt sits in many pairs, and pairs resampled as if independent
    # gave intervals 0.57x as wide as the gap really varies (a simulation in the tests). A pair counts as often as
    # both its prompts were drawn.
    draws = {k: rng.multinomial(len(states[k]), np.full(len(states[k]), 1 / len(states[k])), size=resamples)
             for k in states}
    weights = {kind: draws[kind[0]][:, index[kind][0]] * draws[kind[1]][:, index[kind][1]] for kind in ("nn", "nm")}
    kept = (weights["nn"].sum(1) > 0) & (weights["nm"].sum(1) > 0)  # a draw of tiny sets may leave a type no pair
    mean_angle = {kind: weights[kind][kept] @ angles[kind] / weights[kind][kept].sum(1, keepdims=True)
                  for kind in weights}
    return {"pairs_used": {kind: int(len(index[kind][0])) for kind in index},
            **{kind: c.mean(0) for kind, c in cosines.items()}, **{f"{k}_std": c.std(0) for k, c in cosines.items()},
            **{f"angle_{kind}_deg": a.mean(0) for kind, a in angles.items()},
            "gap_deg": angles["nm"].mean(0) - angles["nn"].mean(0),
            "gap_boot": mean_angle["nm"] - mean_angle["nn"]}


def early_layer_count(num_layers):
    return max(2, round(num_layers / 10))


def find_initial_range(gap, gap_boot):
    """((start, end) or None, the rule with its numbers, why not): INITIAL_RANGE_RULE on a gap curve and its
    bootstrap resamples (paired: resample r is a whole curve gap_boot[r])."""
    num_layers, early = len(gap), early_layer_count(len(gap))
    low, high = np.percentile(gap_boot, [2.5, 97.5], axis=0)
    noise, margin = float(high[:early].max()), float((high[:early] - low[:early]).max())
    threshold = noise + margin
    rule = {"method": INITIAL_RANGE_RULE, "bootstrap_resamples": int(len(gap_boot)),
            "early_layers": list(range(min(early, num_layers))), "noise_level_deg": noise, "margin_deg": margin,
            "threshold_deg": threshold, "gap_ci_low": low.tolist(), "gap_ci_high": high.tolist()}
    if num_layers <= early + 1:
        return None, rule, f"only {num_layers} layers: too few after the {early} early ones"
    above = low > threshold
    start = next((i for i in range(early, num_layers - 1) if above[i] and above[i + 1:i + 3].any()), None)
    if start is None:
        return None, rule, (f"the angle gap never rises clearly above the early-layer noise (no layer whose lower "
                            f"95% bound and a neighbour's exceed {threshold:.2f} deg; max gap "
                            f"{gap[early:].max():.2f} deg)")

    def clearly_higher(a, b):  # gap[b] > gap[a] at 95%, from the paired resamples
        return b < num_layers and np.percentile(gap_boot[:, b] - gap_boot[:, a], 2.5) > 0

    end = start
    while clearly_higher(end, end + 1) or clearly_higher(end, end + 2):  # one noisy step does not end a rise
        end += 1 if clearly_higher(end, end + 1) else 2
    if end == num_layers - 1:
        return None, rule, (f"the angle gap rises clearly from layer {start} and keeps rising up to the last "
                            f"layer: no peak or plateau to end the range")
    return (start, start + int(np.argmax(gap[start:end + 1]))), rule, None


def span_around_largest_gap(gap):
    """The fallback: the contiguous layers around the largest gap (after the early layers, when the model has more)
    whose gap is at least half-way from the early-layer mean to that maximum."""
    early = early_layer_count(len(gap)) if len(gap) > early_layer_count(len(gap)) else 0
    base = float(np.mean(gap[:early])) if early else 0.0
    peak = early + int(np.argmax(gap[early:]))
    half = base + (gap[peak] - base) / 2
    start = end = peak
    while start - 1 >= early and gap[start - 1] >= half:
        start -= 1
    while end + 1 < len(gap) and gap[end + 1] >= half:
        end += 1
    return start, end


# -- stage 2: scaling a range of blocks, counting over-rejections, moving the bounds --

def projection_modules(block):
    return [m for m in block.modules() if safeft.is_projection(m)]


def norm_modules(block):
    """(name, module) of every normalisation inside a block, at any depth (Qwen3's q_norm and k_norm too)."""
    return [(name, m) for name, m in block.named_modules() if name and "norm" in type(m).__name__.lower()]


def unscaled_weights(block):
    """The weights of a block that the scaling hooks do not reach, norms aside (the paper scales weight matrices):
    a Mixture-of-Experts block's fused experts and router (plain parameters in transformers 5, not linear
    layers). SPPFT freezes them all the same."""
    skipped = {id(p) for module in projection_modules(block) for p in module.parameters()}
    skipped |= {id(p) for _, norm in norm_modules(block) for p in norm.parameters()}
    return [name for name, p in safeft.sppft_frozen_weights(block) if id(p) not in skipped]


@contextlib.contextmanager
def scaled_projections(model, start, end, alpha):
    """While active, every projection in blocks start..end (inclusive) acts as if its weight were alpha * W:
    x(aW)^T + b = a(xW^T + b - b) + b exactly, so a forward hook does it without touching the weights."""
    def hook(module, inputs, output):
        bias = getattr(module, "bias", None)
        return output * alpha if bias is None else (output - bias.to(output.dtype)) * alpha + bias.to(output.dtype)

    with contextlib.ExitStack() as hooks:  # removed however the body ends (a hook handle is a context manager)
        handles = [hooks.enter_context(module.register_forward_hook(hook))
                   for block in safeft.decoder_layers(model)[start:end + 1] for module in projection_modules(block)]
        yield len(handles)


@torch.no_grad()
def greedy_with_shared_prefix(model, tokenizer, id_lists, max_new_tokens, batch_size):
    """Greedy continuations (decoded, stripped) of tokenised prompts, their shared prefix run once per call: the
    same tokens as generate_greedy() (positions count real tokens, finished rows stop at their EOS)."""
    keyword, head = forward_keywords(model)  # asked once, not at every generated token
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or [-1]), device=model.device)
    outputs = [None] * len(id_lists)
    for chunk, output, attention_mask, position_ids in forward_batches(
            model, id_lists, tokenizer.pad_token_id, batch_size, shared_prefix_length(id_lists)):
        next_token = output.logits[:, -1].argmax(-1)
        tokens, done = [next_token], torch.isin(next_token, eos)
        for step in range(1, max_new_tokens):
            if bool(done.all()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(chunk), 1))], dim=1)
            output = model(input_ids=next_token[:, None], attention_mask=attention_mask, use_cache=True, **head,
                           position_ids=position_ids[:, -1:] + step, **{keyword: cache_of(output)})
            next_token = torch.where(done, tokenizer.pad_token_id, output.logits[:, -1].argmax(-1))
            tokens.append(next_token)
            done = done | torch.isin(next_token, eos)
        for row, i in zip(torch.stack(tokens, dim=1).tolist(), chunk):
            cut = next((n for n, t in enumerate(row) if t in eos.tolist()), len(row))
            outputs[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
    return outputs


def make_refusal_counter(model, tokenizer, rows, template, max_new_tokens, batch_size, phrases, share_prefix=True):
    """refusal_flags(start, end, alpha) -> one bool per prompt (refused?) with blocks start..end scaled by alpha
    (start None: the unscaled model). Memoised; .texts holds the generations, .passes counts generation passes
    over all prompts and .forwards the model's forward calls."""
    id_lists = tokenize_prompts(tokenizer, rows, template)

    def count_forward(*_):
        refusal_flags.forwards += 1

    def refusal_flags(start, end, alpha):
        key = (None, None, 1.0) if start is None else (start, end, round(float(alpha), 6))
        if key not in refusal_flags.texts:
            with (model.register_forward_pre_hook(count_forward),
                  contextlib.nullcontext() if start is None else scaled_projections(model, start, end, alpha)):
                refusal_flags.texts[key] = (
                    greedy_with_shared_prefix(model, tokenizer, id_lists, max_new_tokens, batch_size) if share_prefix
                    else safeft.generate_greedy(model, tokenizer, rows, template, max_new_tokens, batch_size))
            refusal_flags.passes += 1
        return [safeft.is_refusal(text, phrases) for text in refusal_flags.texts[key]]

    refusal_flags.texts, refusal_flags.passes, refusal_flags.forwards = {}, 0, 0
    return refusal_flags


def sweep(count, first, limits, limit_names, radius, alpha, max_extra, tick):
    """Moves one bound: count(bound) -> refusals for first +- radius within limits, then, while the best count (the
    most for alpha > 1, the fewest below) sits at an edge of the bounds tried that is not a limit, the next bound
    beyond that edge, at most max_extra of them. -> (best bound, {bound: refusals}, outcome)."""
    sign, counts = (1 if alpha > 1 else -1), {}
    window = [max(limits[0], first - radius), min(limits[1], first + radius)]
    next_bounds = range(window[0], window[1] + 1)
    while True:  # the first window, then one bound at a time past the edge where the best sits
        for bound in next_bounds:
            counts[bound] = count(bound)
            tick()
        low, high, best = min(counts), max(counts), max(sign * c for c in counts.values())
        flat = len(counts) > 1 and len(set(counts.values())) == 1  # one count everywhere: no optimum to follow
        beyond = [b for b, edge, limit in ((high + 1, high, limits[1]), (low - 1, low, limits[0]))
                  if sign * counts[edge] == best and edge != limit]
        extra = len(counts) - (window[1] - window[0] + 1)
        if flat or not beyond or extra >= max_extra:
            break
        next_bounds = beyond[:1]
    chosen = min((b for b in counts if sign * counts[b] == best), key=lambda b: (abs(b - first), b))
    if flat:
        optimum, why = "flat", "every candidate refused the same number"
    elif sign * counts[low] < best and sign * counts[high] < best:
        optimum, why = "interior", "a worse count on both sides"
    elif beyond:
        optimum, why = "cap", f"the best still sat at an edge when --max-extra-passes ({max_extra}) was spent"
    else:
        at_limit = [name for edge, limit, name in zip((low, high), limits, limit_names)
                    if edge == limit and sign * counts[edge] == best]
        optimum = "model_edge" if any("model" in name for name in at_limit) else "range_edge"
        why = f"the best reaches {' and '.join(at_limit)}"
    return chosen, dict(sorted(counts.items())), {"optimum": optimum, "why": why, "first_window": window,
                                                  "searched": [low, high], "extra_passes": extra}


def spread_p(flags):
    """Permutation p of the spread (most minus fewest refusals) among candidates run on the same prompts. With no
    difference between them a prompt's outcomes are exchangeable across candidates, so they are shuffled within each
    prompt; p = the share of shuffles whose spread reaches the observed one. A test of the two extremes alone
    (picked after seeing the counts) passed noise as clear: 12 of 40 simulated sweeps of 7 equal candidates."""
    table = np.array(flags, dtype=np.int8)  # candidates x prompts
    observed = int(np.ptp(table.sum(1)))
    mixed = table[:, table.min(0) != table.max(0)]  # a prompt all candidates agree on adds the same to every count
    if observed == 0:  # one candidate, or all alike
        return 1.0
    rng = np.random.default_rng(0)  # the same p for the same flags, run to run
    shuffled = rng.permuted(np.broadcast_to(mixed, (PERMUTATIONS, *mixed.shape)), axis=1).sum(2, dtype=np.int32)
    reached = int((shuffled.max(1) - shuffled.min(1) >= observed).sum())
    return (1 + reached) / (1 + PERMUTATIONS)


def search_range(refusal_flags, initial, alpha, radius, num_layers, max_extra=MAX_EXTRA_PASSES, tick=lambda: None):
    """The paper's search at one alpha: the end moves with the start fixed, then the start with the best end."""
    (start0, end0), flags = initial, {}

    def count(start, end):
        flags[start, end] = refusal_flags(start, end, alpha)
        return int(sum(flags[start, end]))

    settings = (radius, alpha, max_extra, tick)
    end, ends, upper = sweep(lambda e: count(start0, e), end0, (start0, num_layers - 1),
                             ("the start (a one-layer range)", "the model's last layer"), *settings)
    start, starts, lower = sweep(lambda s: count(s, end), start0, (0, end),
                                 ("the model's first layer", "the end (a one-layer range)"), *settings)
    most, fewest = max(starts, key=starts.get), min(starts, key=starts.get)
    p_value = spread_p([flags[s, end] for s in starts])
    return {"alpha": alpha, "start": start, "end": end,
            "upper_sweep": [{"start": start0, "end": e, "refusals": c} for e, c in ends.items()],
            "lower_sweep": [{"start": s, "end": end, "refusals": c} for s, c in starts.items()],
            "upper_sweep_outcome": upper, "lower_sweep_outcome": lower,
            "lower_sweep_spread": starts[most] - starts[fewest], "p_value": p_value, "clear": p_value < CLEAR_P}


def scaling_search(counter, initial, num_layers, args, log=print):
    """Stage 2: the baseline, then the search at --scale, or (--scale auto) at 1 +- n x --scale-step, n = 1, 2, ...
    until the start's sweep is clear or --max-scale-steps were tried. 'auto' takes its direction from the baseline
    (a model refusing more than half the prompts has little room to refuse more) unless --scale-direction says."""
    scale, direction, flags = args.scale, args.scale_direction, counter(None, None, 1.0)
    baseline, queries = int(sum(flags)), len(flags)
    log(f"stage 2: the unscaled model refuses {baseline}/{queries} over-rejection prompts")
    if scale == "auto":
        up = baseline <= queries / 2 if direction == "auto" else direction == "up"
        chosen_by = (f"the baseline: {baseline}/{queries} refused, {'at most' if up else 'more than'} half"
                     if direction == "auto" else f"--scale-direction {direction}")
        # locate() has checked that scaling down by 1 - n x step keeps a positive factor
        scales = [round(1 + (1 if up else -1) * args.scale_step * n, 6) for n in range(1, args.max_scale_steps + 1)]
    else:
        up, chosen_by, scales = scale > 1, f"--scale {scale:g}", [scale]
        if (up and baseline > 0.9 * queries) or (not up and baseline < 0.1 * queries):
            log(f"warning: --scale {scale:g} has little room: the unscaled model refuses {baseline}/{queries}")
    log(f"stage 2: scale {'> 1, keeping the most' if up else '< 1, keeping the fewest'} refusals ({chosen_by})")
    attempts = []
    for alpha in scales:
        with tqdm(desc=f"scaling search at {alpha:g}", bar_format="{desc}: {n} candidates [{elapsed}]",
                  leave=False) as bar:
            attempt = search_range(counter, initial, alpha, args.search_radius, num_layers,
                                   args.max_extra_passes, lambda: bar.update(1))
        attempts.append(attempt)
        for bound, key in (("end", "upper_sweep"), ("start", "lower_sweep")):
            tried = ", ".join(f"{r[bound]}:{r['refusals']}" for r in attempt[key])
            outcome = attempt[key + "_outcome"]
            log(f"  scale {alpha:g}, moving the {bound} ({bound}:refusals): {tried} -> {attempt[bound]} "
                f"({outcome['optimum']}: {outcome['why']})")
        if attempt["clear"]:
            break
    # One generation pass per distinct candidate (the counter memoises) and the baseline's.
    passes = 1 + len({(row["start"], row["end"], a["alpha"]) for a in attempts
                      for row in a["upper_sweep"] + a["lower_sweep"]})
    if not attempt["clear"]:
        log(f"stage 2: the start's sweep is not clear (permutation p = {attempt['p_value']:.3g} >= {CLEAR_P}) at scale "
            f"{attempt['alpha']:g}: the bounds it picked are weakly supported")
    return {
        "skipped": False, "alpha": attempt["alpha"], "alpha_mode": "auto" if scale == "auto" else "fixed",
        "direction": {"scale": "up" if up else "down", "keep": f"{'most' if up else 'fewest'} refusals",
                      "chosen_by": chosen_by},
        "queries": queries, "baseline_refusals": baseline,
        **{k: v for k, v in attempt.items() if k not in ("alpha", "start", "end")},
        "clear_rule": f"permutation test of the spread (most minus fewest refusals) among the start candidates, "
                      f"each prompt's outcomes shuffled across them ({PERMUTATIONS} shuffles), p < {CLEAR_P}",
        "search_radius": args.search_radius, "max_extra_passes": args.max_extra_passes, "attempts": attempts,
        "cost": {"generation_passes": passes, "prompts_generated": passes * queries,
                 "model_forward_calls": getattr(counter, "forwards", None),
                 "extra_passes": sum(a[k]["extra_passes"] for a in attempts
                                     for k in ("upper_sweep_outcome", "lower_sweep_outcome"))},
        "result": {"start": attempt["start"], "end": attempt["end"]},
    }


def refusal_examples(rows, refusal_flags, safety, alpha):
    """Up to five prompts whose refusal the chosen scaling changed, with both generations, for a reader to judge."""
    key = (safety[0], safety[1], round(float(alpha), 6))
    base, scaled, texts = refusal_flags(None, None, 1.0), refusal_flags(*key), refusal_flags.texts
    return [{"prompt": safeft.prompt_messages(rows[i])[-1]["content"], "refused_unscaled": base[i],
             "unscaled": texts[None, None, 1.0][i], "scaled": texts[key][i]}
            for i in [i for i in range(len(rows)) if base[i] != scaled[i]][:5]]


# -- the same freeze for other trainers --

def freeze_exports(model, safety, about):
    """What PEFT, axolotl and any full fine-tune need to leave the safety layers as finetune.py does: LoRA only on
    the other layers; in a full fine-tune every parameter trains except the safety layers' attention and MLP
    weights (the blocks' own norms train, as in the authors' code). Checked against this model's parameter names."""
    blocks = safeft.decoder_layers(model)
    if len({tuple(name for name, _ in block.named_parameters()) for block in blocks}) > 1:
        return None  # a hybrid model (attention and convolution or Mamba blocks): one pattern cannot cover them
    path = next(name for name, module in model.named_modules() if module is blocks)  # e.g. model.layers
    safe = list(range(safety[0], safety[1] + 1))
    others = [i for i in range(len(blocks)) if i not in safe]
    inside = [name for name, _ in blocks[safe[0]].named_parameters()]
    frozen_inside = [name for name, _ in safeft.sppft_frozen_weights(blocks[safe[0]])]
    # Whole submodules where all their parameters freeze (self_attn., mlp.), single names otherwise.
    parts = [c + "." for c in sorted({n.split(".")[0] for n in frozen_inside})
             if all(n in frozen_inside for n in inside if n.startswith(c + "."))]
    parts += [n for n in frozen_inside if not any(n.startswith(part) for part in parts)]
    alternatives = "|".join(re.escape(part) + (".+" if part.endswith(".") else "") for part in parts)
    # Any wrapper prefix (PEFT's base_model.model., DDP's module.) is allowed before the layers.
    freeze_regex = rf"(?:.+\.)?{re.escape(path)}\.(?:{'|'.join(map(str, safe))})\.(?:{alternatives})"
    names = [name for name, _ in model.named_parameters()]
    frozen = [name for name in names if re.fullmatch(freeze_regex, name)]
    # axolotl's dialect: a dot is literal unless followed by "+"; a pattern matches from the start of a name.
    in_layers = {f"{path}.{i}.{n}" for i in range(len(blocks)) for n in inside}
    unfrozen = [f"^{name}$" for name in names if name not in in_layers]
    unfrozen += [f"^{path}.({'|'.join(map(str, others))})..+$"] if others else []
    kept = [n for n in inside if n not in frozen_inside]
    unfrozen += [f"^{path}.({'|'.join(map(str, safe))}).({'|'.join(kept)})$"] if kept else []
    trainable = {n for n in names if any(re.match(re.sub(r"\.(?!\+)", r"\\.", p), n) for p in unfrozen)}
    if trainable != set(names) - set(frozen) or len(frozen) != len(safe) * len(frozen_inside):
        raise RuntimeError(f"the freeze exports do not split the parameters of {type(model).__name__} as intended")
    return {"format": "safety-layers-freeze/v1", "about": about,
            "peft_lora_config": {"target_modules": safeft.projection_names(model), "layers_to_transform": others,
                                 "layers_pattern": path.rsplit(".", 1)[-1], "task_type": "CAUSAL_LM"}
            if others else None,  # an empty layers_to_transform would put LoRA on every layer
            "axolotl_unfrozen_parameters": unfrozen,
            "full_finetuning": {"freeze_regex": freeze_regex, "frozen_parameters": frozen,
                                "trainable_parameters": len(names) - len(frozen),
                                "usage": "for name, p in model.named_parameters(): "
                                         "p.requires_grad_(not re.fullmatch(freeze_regex, name))"}}


# -- plot --

def plot_results(path, report, overwrite):
    """One PNG: cosine curves with std bands, the gap with its bootstrap band, every candidate of the search."""
    from matplotlib.figure import Figure  # no pyplot: never touches a notebook's backend
    from matplotlib.ticker import MaxNLocator
    layers, initial, final = np.arange(report["num_layers"]), report["initial_range"], report["safety_layers"]
    rule, scaling, cosine = report["initial_range_rule"], report["scaling"], report["cosine"]
    fig = Figure(figsize=(10, 12), layout="constrained")
    ax_cos, ax_gap, ax_sweep = fig.subplots(3, 1)
    for kind, color, name in (("nn", "tab:blue", "normal-normal"), ("nm", "tab:red", "normal-malicious"),
                              ("mm", "tab:green", "malicious-malicious")):
        mean, std = np.asarray(cosine[kind]), np.asarray(cosine[kind + "_std"])
        ax_cos.plot(layers, mean, "o-", ms=3, color=color, label=name)
        ax_cos.fill_between(layers, mean - std, mean + std, color=color, alpha=0.12)
    ax_cos.set(ylabel="cosine similarity (mean +- std)")
    ax_cos.set_title(f"{report['model']}: last-token hidden states (raw block outputs), {cosine['pairs']} pairs per "
                     f"type", fontsize=10)
    ax_gap.plot(layers, cosine["gap_deg"], "o-", ms=3, color="black", label="gap = angle(NM) - angle(NN)")
    ax_gap.fill_between(layers, rule["gap_ci_low"], rule["gap_ci_high"], color="gray", alpha=0.3, label="95% interval")
    ax_gap.axhline(rule["threshold_deg"], color="tab:purple", ls="--", lw=1, label="early-layer noise + margin")
    ax_gap.axvspan(-0.5, rule["early_layers"][-1] + 0.5, color="tab:purple", alpha=0.08, label="early layers")
    ax_gap.set(ylabel="angle gap (degrees)", xlabel="decoder layer (0-based)")
    ax_gap.set_title(textwrap.fill("angle gap: " + (f"NO CLEAR RANGE: {report['fallback_reason']}" if report["fallback"]
                                                    else f"initial range {initial['start']}-{initial['end']}"), 130),
                     fontsize=9)
    if scaling["skipped"]:
        ax_sweep.text(0.5, 0.5, "scaling search skipped: safety layers = initial range", ha="center",
                      transform=ax_sweep.transAxes)
        ax_sweep.set_axis_off()
    else:
        for attempt in scaling["attempts"]:  # refusals against the moving bound (faded: not the chosen scale)
            fade = 1.0 if attempt["alpha"] == scaling["alpha"] else 0.25
            for key, bound, color, marker in (("upper_sweep", "end", "tab:orange", "o"),
                                              ("lower_sweep", "start", "tab:cyan", "s")):
                rows, outcome = attempt[key], attempt[key + "_outcome"]
                inside = [r for r in rows if outcome["first_window"][0] <= r[bound] <= outcome["first_window"][1]]
                outside = [r for r in rows if r not in inside]
                ax_sweep.plot([r[bound] for r in rows], [r["refusals"] for r in rows], "-", color=color, alpha=fade)
                ax_sweep.plot([r[bound] for r in inside], [r["refusals"] for r in inside], marker, color=color,
                              alpha=fade, label=f"scale {attempt['alpha']:g}, moving the {bound}: {outcome['optimum']}")
                ax_sweep.plot([r[bound] for r in outside], [r["refusals"] for r in outside], marker, mfc="none",
                              color=color, alpha=fade)
        ax_sweep.axhline(scaling["baseline_refusals"], color="gray", ls="--", label="unscaled model")
        ax_sweep.set(xlabel="the moving bound (layer; filled: first window, hollow: beyond it)",
                     ylabel=f"refusals of {scaling['queries']} over-rejection prompts")
        ax_sweep.set_title(f"scaling search at {scaling['alpha']:g} ({scaling['alpha_mode']}), permutation p = "
                           f"{scaling['p_value']:.3g}", fontsize=9)
        # layers and refusals are whole numbers, and a count is never negative (all-zero sweeps drew -0.04..0.04)
        ax_sweep.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_sweep.yaxis.set_major_locator(MaxNLocator(integer=True))
        low, high = ax_sweep.get_ylim()
        if low < 0:
            ax_sweep.set_ylim(-0.5, max(high, 1.5))
    for ax in (ax_cos, ax_gap) + (() if scaling["skipped"] else (ax_sweep,)):
        ax.axvspan(initial["start"] - 0.5, initial["end"] + 0.5, color="gold", alpha=0.25, label=f"initial range "
                   f"{initial['start']}-{initial['end']}{' (fallback)' if report['fallback'] else ''}")
        ax.axvspan(final["start"] - 0.5, final["end"] + 0.5, facecolor="none", edgecolor="crimson", hatch="//",
                   label=f"safety layers {final['start']}-{final['end']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in (ax_cos, ax_gap):
        ax.set_xlim(-0.5, len(layers) - 0.5)
    with safeft.atomic_file(path, ".png", overwrite) as tmp:
        fig.savefig(tmp, dpi=110)


# -- the procedure --

def read_prompt_sets(args):
    """The prompt sets, exact duplicates dropped within each file (read_rows) and across the normal and malicious
    sets (from both: such a prompt stands for neither), with notes of what was dropped."""
    sets, data, notes = {}, {}, []
    for name, path, label in (("normal", args.normal, "safe"), ("malicious", args.malicious, "unsafe"),
                              ("over_rejection", args.over_rejection, "safe"))[:2 if args.skip_scaling else 3]:
        sets[name] = safeft.read_rows(path, args.prompt_field, args.response_field, limit=args.limit,
                                      flag="--" + name.replace("_", "-"), label=label, label_field=args.label_field)
        notes += sets[name].notes
        data[name] = {"path": path, "sha256": safeft.sha256_file(path)}  # a datasets folder too
    keys = {name: [json.dumps(safeft.prompt_messages(row)) for row in sets[name]] for name in ("normal", "malicious")}
    both = set(keys["normal"]) & set(keys["malicious"])
    if both:
        notes.append(f"dropped {len(both)} prompt(s) found in both --normal and --malicious from both sets")
        print(f"note: {notes[-1]}", file=sys.stderr)
    for name in keys:
        sets[name] = [row for row, key in zip(sets[name], keys[name]) if key not in both]
    for name in sets:
        least = MIN_PROMPTS if name in keys else 1
        if len(sets[name]) < least:
            raise UserError(f"--{name.replace('_', '-')}: {data[name]['path']} has {len(sets[name])} distinct "
                            f"prompt(s) left; need at least {least}")
        data[name]["rows"] = len(sets[name])
    return sets, dict(data, notes=notes)


def locate(args, log=print):
    """Check, load, stage 1, stage 2, verify, save; returns the report written to --out."""
    started, timing, stem = time.time(), {}, os.path.splitext(args.out)[0]
    paths = {"json": args.out, "plot": stem + ".png", "peft": stem + ".peft.json", "axolotl": stem + ".axolotl.yaml",
             "freeze": stem + ".freeze.json"}
    # 1. Everything the flags, the data, the config and the tokenizer can tell, before the weights load.
    flags = {what: "--out" + ("" if what == "json" else f" (its {what} file)") for what in paths}
    safeft.check_distinct_outputs([(flags[what], path) for what, path in paths.items()])  # --out x.png: the plot's
    inputs = safeft.given_paths(args, "out")
    for what, path in paths.items():
        safeft.check_output_location(path, args.overwrite, flags[what], inputs=inputs)
    if args.skip_scaling:  # stage 2's settings would shape nothing
        stage2 = ["scale", "alpha", "scale_direction", "scale_step", "max_scale_steps", "search_radius",
                  "max_extra_passes", "max_new_tokens", "refusal_phrases"]
        safeft.unused_flags(args, build_parser(), stage2, "with --skip-scaling, which runs no stage 2")
    if args.alpha is not None:
        print("note: --alpha is now --scale (the layer scale factor; --alpha will go)", file=sys.stderr)
        args.scale = args.alpha
    if args.strict and args.initial_range:  # --initial-range is the fallback that --strict refuses
        raise UserError("--strict and --initial-range contradict each other: --initial-range is used only when "
                        "stage 1 finds no clear range, which --strict makes an error; pass one of them")
    if args.scale != "auto" and not args.skip_scaling:
        safeft.unused_flags(args, build_parser(), ["scale_step", "max_scale_steps"],
                            f"with a fixed --scale {args.scale:g} (only --scale auto steps)")
    if args.bootstrap < 100:
        raise UserError(f"--bootstrap: {args.bootstrap} resamples cannot give 95% intervals; use at least 100")
    if (not args.skip_scaling and args.scale == "auto" and args.scale_step * args.max_scale_steps >= 1
            and args.scale_direction != "up"):
        # scaling down by 1 - k x step must keep a positive factor, or the search would run on a zeroed model
        raise UserError(f"--scale-step {args.scale_step:g} x --max-scale-steps {args.max_scale_steps} reaches a "
                        f"factor <= 0 when scaling down; use a smaller step or fewer steps")
    if (not args.skip_scaling and args.scale != "auto" and args.scale_direction != "auto"
            and (args.scale > 1) != (args.scale_direction == "up")):
        raise UserError(f"--scale-direction {args.scale_direction} contradicts --scale {args.scale:g}")
    flag_range = safeft.parse_layer_range(args.initial_range, "--initial-range") if args.initial_range else None
    phrases = None if args.skip_scaling else safeft.load_refusal_phrases(args.refusal_phrases)
    sets, data = read_prompt_sets(args)
    config = safeft.load_config(args.model)
    num_layers = config.num_hidden_layers
    block = None if args.skip_scaling else safeft.decoder_layers(safeft.meta_model(config))[0]  # stage 2's warnings
    unscaled = [] if block is None else unscaled_weights(block)
    if unscaled:  # the paper's code scales the projection weights of a dense model; here that leaves some out
        print(f"warning: stage 2 scales each block's linear projections, and this model's blocks also hold "
              f"{', '.join(unscaled)}, which are not scaled: the search is not the paper's on this model",
              file=sys.stderr)
    inner_norms = [] if block is None else [name for name, _ in norm_modules(block) if "." in name]
    if inner_norms:  # RMSNorm(a x) = RMSNorm(x): a norm after a projection undoes its scale
        print(f"note: this model normalises inside its blocks ({', '.join(inner_norms)}), which undoes the scaling "
              f"of the projections those norms follow (q_proj and k_proj where queries and keys are normalised)",
              file=sys.stderr)
    if flag_range:
        safeft.check_layers_within(*flag_range, num_layers, "--initial-range")
    tokenizer, template = safeft.load_tokenizer(args.model, args.template)
    safeft.check_template_fits(template, *sets.values())

    # 2. Load, and check that the shared-prefix shortcut gives this model's own results.
    safeft.set_seed(args.seed)
    tick = time.time()
    model = safeft.load_model(args.model, bool(args.load_in_4bit))
    timing["load_model"] = time.time() - tick
    stage1_rows, n_normal = sets["normal"] + sets["malicious"], len(sets["normal"])
    share_prefix = not args.no_prefix_sharing
    if share_prefix:
        share_prefix, why = prefix_sharing_works(model, tokenize_prompts(tokenizer, stage1_rows, template),
                                                 tokenizer.pad_token_id)
        log(f"prefix sharing {'on' if share_prefix else 'off'}: {why}")

    # 3. Stage 1: hidden states, cosine statistics, the initial range (or the fallback).
    tick = time.time()
    states = last_token_states(model, tokenizer, stage1_rows, template, args.batch_size, share_prefix)
    cosine = cosine_statistics(states[:n_normal], states[n_normal:], args.pairs, args.seed, args.bootstrap)
    timing["stage1"] = time.time() - tick
    gap = cosine["gap_deg"]
    found, rule, reason = find_initial_range(gap, cosine.pop("gap_boot"))
    log(f"stage 1: {n_normal} normal + {len(sets['malicious'])} malicious prompts, {num_layers} layers; largest angle "
        f"gap {gap.max():.2f} deg at layer {int(gap.argmax())}; early-layer threshold {rule['threshold_deg']:.2f} deg")
    initial = found or flag_range or span_around_largest_gap(gap)
    if found:
        log(f"stage 1: initial range {initial[0]}-{initial[1]}: the gap rises clearly above the early-layer noise at "
            f"{initial[0]}, the rise ends at {initial[1]}" + ("; --initial-range unused" if flag_range else ""))
    elif args.strict:
        raise UserError(f"--strict: no clear safety-layer range: {reason}")
    else:
        reason += f"; using {'--initial-range' if flag_range else 'the span around the largest gap'} " \
                  f"{initial[0]}-{initial[1]}"
        log(f"stage 1: NO CLEAR SAFETY-LAYER RANGE: {reason}")

    # 4. Stage 2: the scaling search over the over-rejection prompts.
    tick = time.time()
    if args.skip_scaling:
        safety, source = initial, "initial range (--skip-scaling: no scaling search)"
        scaling = {"skipped": True, "alpha": None, "queries": 0, "baseline_refusals": None,
                   "upper_sweep": [], "lower_sweep": []}
    else:
        counter = make_refusal_counter(model, tokenizer, sets["over_rejection"], template, args.max_new_tokens,
                                       args.batch_size, phrases, share_prefix)
        scaling = scaling_search(counter, initial, num_layers, args, log)
        if args.strict and args.scale == "auto" and not scaling["clear"]:
            raise UserError(f"--strict: no scale up to {scaling['alpha']:g} separates the start candidates clearly "
                            f"(permutation p = {scaling['p_value']:.3g})")
        safety, source = tuple(scaling["result"].values()), f"scaling search at scale {scaling['alpha']:g}"
        scaling.update(max_new_tokens=args.max_new_tokens,
                       refusal_phrases=args.refusal_phrases or f"built-in ({len(safeft.REFUSAL_PHRASES)} phrases)",
                       examples=refusal_examples(sets["over_rejection"], counter, safety, scaling["alpha"]))
    timing["stage2_scaling"] = time.time() - tick

    # 5. Verify (freeze_exports checks its patterns against the model) and save; the JSON last, so that its
    # presence means a complete run (an earlier run's JSON goes first: beside new exports it would pass for theirs).
    exports = freeze_exports(model, safety, f"safety layers {safety[0]}-{safety[1]} (0-based, inclusive) of "
                                            f"{args.model}")
    files = {}  # export: its content (peft none when every layer is a safety layer: LoRA would go everywhere)
    if exports is None:
        log("the decoder blocks differ in their parameters (a hybrid model), so no exports for other trainers are "
            "written; finetune.py reads the JSON")
    else:
        files = {"peft": exports["peft_lora_config"], "axolotl": "\n".join(
            [f"# axolotl: train everything but the attention and MLP weights of the {exports['about']}",
             "unfrozen_parameters:"] + [f"  - {json.dumps(p)}" for p in exports["axolotl_unfrozen_parameters"]]
        ) + "\n", "freeze": exports}
        files = {what: content for what, content in files.items() if content}
    if args.overwrite:
        for what in ("json", "peft", "axolotl", "freeze"):
            if (what == "json" or what not in files) and os.path.exists(paths[what]):
                os.remove(paths[what])
    memory_mb, memory_kind = safeft.peak_memory_mb()
    report = {
        "format": safeft.SAFETY_LAYERS_FORMAT, "model": args.model, "num_layers": num_layers, "template": template,
        "fingerprint": safeft.model_fingerprint(model.config), "load_in_4bit": bool(args.load_in_4bit),
        "safety_layers": {"start": int(safety[0]), "end": int(safety[1])}, "safety_layers_source": source,
        "initial_range": {"start": int(initial[0]), "end": int(initial[1])}, "fallback": not found,
        "fallback_reason": None if found else reason, "initial_range_rule": rule, "hidden_states": HIDDEN_STATES,
        "cosine": {"pairs": args.pairs, "pairs_used": cosine.pop("pairs_used"), "layers": list(range(num_layers)),
                   **{k: v.tolist() for k, v in cosine.items()}},
        "scaling": scaling, "prefix_sharing": share_prefix, "batch_size": args.batch_size, "data": data,
        "exports": {what: paths[what] for what in files},
        "seed": args.seed, "created_at": safeft.now_iso(), "versions": safeft.library_versions(),
        "peak_memory_mb": memory_mb, "peak_memory_kind": memory_kind, "plot": paths["plot"],
    }
    for what, content in files.items():
        write = safeft.write_text_atomic if what == "axolotl" else safeft.write_json_atomic
        write(paths[what], content, args.overwrite)
    plot_results(paths["plot"], report, args.overwrite)
    report["timing_s"] = {k: round(v, 3) for k, v in dict(timing, total=time.time() - started).items()}
    safeft.write_json_atomic(args.out, report, args.overwrite)
    log(f"safety layers: {safety[0]}-{safety[1]} ({source}{'; initial range is a FALLBACK' if not found else ''})")
    log(f"wrote {args.out}, {paths['plot']}"
        + (f" and for other trainers {', '.join(report['exports'].values())}" if files else ""))
    return report


def scale_value(text):
    """--scale: 'auto' or a factor > 0 other than 1."""
    if str(text).strip().lower() == "auto":
        return "auto"
    value = safeft.positive_float(text)
    if not math.isfinite(value) or value == 1:
        raise argparse.ArgumentTypeError(f"must be > 0 and not 1 (above 1 raises refusals, below 1 lowers them), "
                                         f"got {text}")
    return value


def build_parser():
    parser = safeft.script_parser(
        "locate_layers.py", f"Find the safety layers (Li et al. 2025). Hidden states: {HIDDEN_STATES}. Initial range: "
                            f"{INITIAL_RANGE_RULE}.",
        epilog="How the scaling search moves the bounds, and what it costs: python -c \"import locate_layers; "
               "help(locate_layers)\"")
    safeft.add_common_args(parser, DEFAULT_OUT, bound="limit")
    data = parser.add_argument_group("data")
    data.add_argument("--normal", default=DEFAULT_NORMAL, help="ordinary prompts (stage 1)")
    data.add_argument("--malicious", default=DEFAULT_MALICIOUS, help="malicious prompts (stage 1)")
    data.add_argument("--over-rejection", default=DEFAULT_OVER_REJECTION,
                      help="benign prompts that sound dangerous, whose refusals stage 2 counts")
    stage1 = parser.add_argument_group("stage 1: cosine analysis")
    stage1.add_argument("--pairs", type=safeft.positive_int, default=PAIRS,
                        help="random pairs of distinct prompts per type (NN, NM, MM); all pairs if fewer exist")
    stage1.add_argument("--bootstrap", type=safeft.positive_int, default=BOOTSTRAP,
                        help="bootstrap resamples of the prompts for the gap's 95%% intervals (at least 100)")
    stage1.add_argument("--initial-range", default=None, metavar="A-B",
                        help="the initial range when stage 1 finds no clear one (default: the span around the "
                             "largest gap); a clear range found by stage 1 takes precedence")
    stage1.add_argument("--strict", action="store_true",
                        help="an error instead of a fallback when there is no clear initial range (and when --scale "
                             "auto ends without a clear sweep of the start)")
    stage2 = parser.add_argument_group("stage 2: over-rejection scaling search")
    stage2.add_argument("--skip-scaling", action="store_true",
                        help="stop after stage 1; the safety layers are then the initial range")
    stage2.add_argument("--scale", type=scale_value, default="auto",
                        help="factor for the candidate layers' projections (> 1: keep the most refusals, < 1: the "
                             "fewest), or auto: 1 +- --scale-step, stepping until the start's sweep is clear "
                             "(permutation p < 0.05)")
    stage2.add_argument("--alpha", type=scale_value, default=None, help=argparse.SUPPRESS)  # the old --scale
    stage2.add_argument("--scale-direction", default="auto", choices=("auto", "up", "down"),
                        help="for --scale auto: up (> 1) or down (< 1); auto = down when the unscaled model refuses "
                             "more than half the prompts (no room to refuse more), else up")
    stage2.add_argument("--scale-step", type=safeft.positive_float, default=SCALE_STEP, help="step of --scale auto")
    stage2.add_argument("--max-scale-steps", type=safeft.positive_int, default=MAX_SCALE_STEPS,
                        help="most factors --scale auto tries")
    stage2.add_argument("--search-radius", type=safeft.non_negative_int, default=SEARCH_RADIUS,
                        help="k: each bound first moves over +-k layers")
    stage2.add_argument("--max-extra-passes", type=safeft.non_negative_int, default=MAX_EXTRA_PASSES,
                        help="bounds one sweep may try beyond its first window while its best sits at an edge "
                             "(each costs one generation pass over the over-rejection prompts)")
    stage2.add_argument("--max-new-tokens", type=safeft.positive_int, default=MAX_NEW_TOKENS,
                        help="greedy tokens generated per prompt")
    safeft.add_refusal_phrases_arg(stage2)
    parser.add_argument("--batch-size", type=safeft.positive_int, default=BATCH_SIZE, help="prompts per forward pass")
    parser.add_argument("--no-prefix-sharing", action="store_true",
                        help="run every prompt in full instead of computing the shared template prefix once")
    return parser


def main(argv=None):
    return safeft.run_main(locate, build_parser(), argv, one_process=True)


if __name__ == "__main__":
    main()
