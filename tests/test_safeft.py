"""safeft.py, the shared module: prompts and examples, model loading (embedded models too), outputs, flags."""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import safeft as h
from conftest import ROOT, make_tokenizer

# -- prompts and examples --

def test_templates(tiny_llama):
    tokenizer, template = h.load_tokenizer(tiny_llama)
    assert template == "chat" and h.resolve_template(tokenizer, "auto") == "chat"
    assert h.format_prompt(tokenizer, "hi", "chat") == "<|user|> hi <|end|> <|assistant|>"
    assert h.format_prompt(tokenizer, "hi", "alpaca").endswith("### Instruction:\nhi\n\n### Response:\n")
    assert h.format_prompt(tokenizer, "hi", "none") == "hi"
    alpaca_row = {"prompt": "sum these", "input": "1 2", "line": 1}
    assert h.format_prompt(tokenizer, alpaca_row, "alpaca").endswith("### Input:\n1 2\n\n### Response:\n")
    assert h.format_prompt(tokenizer, alpaca_row, "none") == "sum these\n\n1 2"
    tokenizer.chat_template = None
    assert h.resolve_template(tokenizer, "auto") == "alpaca"
    with pytest.raises(h.UserError, match="--template chat"):
        h.resolve_template(tokenizer, "chat")


def row(prompt, response):
    return {"prompt": prompt, "response": response, "line": 1}


def test_build_example_masks_prompt_and_ends_with_eos(tiny_llama):
    tokenizer, _ = h.load_tokenizer(tiny_llama)
    example = h.build_example(tokenizer, row("how do i make bread ?", "here is a recipe"), "chat", 128)
    prompt_len = len(tokenizer(h.format_prompt(tokenizer, "how do i make bread ?", "chat"),
                               add_special_tokens=False)["input_ids"])
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][prompt_len:-1]) == "here is a recipe"
    bread = row("how do i make bread ?", "here is a recipe")
    full = h.build_example(tokenizer, bread, "chat", 128, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    short = h.build_example(tokenizer, row("how do i make bread ?", "here is a recipe"), "chat", 5)
    assert len(short["input_ids"]) == len(short["labels"]) == 5


def test_collate_pads_left_with_positions():
    batch = h.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                       {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_a_chat_template_that_cannot_render_turn_by_turn_is_named(tiny_llama):
    # This template writes the number of turns first, so a conversation's prefix renders differently from the
    # start of the whole: the assistant turns' tokens cannot be located, and the row says where it came from.
    tokenizer, _ = h.load_tokenizer(tiny_llama)
    tokenizer.chat_template = "{{ messages | length }} {% for m in messages %}{{ m['content'] }} {% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat = {"messages": messages, "prompt": "hi", "response": "hello", "line": 3, "where": "chat.jsonl:3"}
    with pytest.raises(h.UserError, match="^chat.jsonl:3: the chat template does not render this conversation"):
        h.build_example(tokenizer, chat, "chat", 64)


def test_build_examples_skips_and_names_rows_with_no_answer_token_left(tiny_llama, capsys):
    tokenizer, template = h.load_tokenizer(tiny_llama)
    rows = [{**row("hi", "hello there"), "line": 1}, {**row("tell me " * 40, "ok"), "line": 2},
            {**row("how do i make bread ?", "here is a recipe"), "line": 3}]
    examples = h.build_examples(tokenizer, rows, template, 24, "--data")
    assert len(examples) == 2 and all(len(e["input_ids"]) <= 24 for e in examples)
    err = capsys.readouterr().err
    assert "--data: 1 row keeps no answer token within --max-length 24 (line 2)" in err
    with pytest.raises(h.UserError, match="--max-length 24: no row of --data"):
        h.build_examples(tokenizer, rows[1:2], template, 24, "--data")


def test_response_loss_equals_the_models_own_loss_on_unpadded_rows(tiny_llama, monkeypatch):
    """Left padding + position_ids + logits only on the answer span give each row's own loss, and so does the
    full-logits path of a model whose forward takes no logits_to_keep."""
    tokenizer, template = h.load_tokenizer(tiny_llama)
    model = h.load_model(tiny_llama)
    rows = [row("how do i make bread ?", "here is a recipe"), row("hi", "hello there , how can i help you today ?")]
    examples = [h.build_example(tokenizer, r, template, 128) for r in rows]
    batch = h.collate(examples, tokenizer.pad_token_id)
    assert h.forward_accepts(model, "logits_to_keep")
    with torch.no_grad():
        loss_sum, count = h.response_loss_sum(model, batch)
        monkeypatch.setattr(h, "forward_accepts", lambda model, keyword: False)
        full_sum, full_count = h.response_loss_sum(model, batch)
    assert full_count == count and abs(float(full_sum) - float(loss_sum)) < 1e-4 * count
    expected_sum, expected_count = 0.0, 0
    for e in examples:  # each row alone, unpadded, through the model's own loss
        labels = torch.tensor([e["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            expected_sum += float(model(input_ids=torch.tensor([e["input_ids"]]), labels=labels).loss) * n
        expected_count += n
    assert count == expected_count
    assert abs(float(loss_sum) - expected_sum) < 1e-4 * expected_count


# -- models --

def test_gpt2_style_blocks_and_conv1d_projections_are_found():
    """GPT-2 style models keep their blocks in transformer.h and their projections in transformers' Conv1D."""
    from transformers import AutoModelForCausalLM, GPT2Config
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    assert h.decoder_layers(model) is model.transformer.h
    assert h.projection_names(model) == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(h.UserError, match="cannot find the decoder layers of Linear"):
        h.decoder_layers(torch.nn.Linear(2, 2))


def test_load_model_cpu_fp32_left_padding(tiny_model):
    model = h.load_model(tiny_model)
    tokenizer, _ = h.load_tokenizer(tiny_model)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert not model.training
    assert len(h.decoder_layers(model)) == 4
    assert h.model_fingerprint(model.config)["num_layers"] == 4
    assert h.model_fingerprint(h.load_config(tiny_model)) == h.model_fingerprint(model.config)


def test_generate_greedy_batched_matches_single(tiny_model):
    model = h.load_model(tiny_model)
    tokenizer, _ = h.load_tokenizer(tiny_model)
    prompts = ["how do i make a cake ?", "hi", "write a poem about the best way to make bread please"]
    batched = h.generate_greedy(model, tokenizer, prompts, "chat", 6, batch_size=3)
    single = [h.generate_greedy(model, tokenizer, [p], "chat", 6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched) and len(set(batched)) > 1


def test_load_in_4bit_on_cpu(tmp_path):
    import bitsandbytes as bnb

    from conftest import make_tiny_model
    # Widths that are multiples of the 64-wide quantisation block: the CPU kernels of every x86 CPU take them.
    model = h.load_model(make_tiny_model("llama", tmp_path / "m", hidden=64), load_in_4bit=True)
    assert isinstance(h.decoder_layers(model)[0].mlp.up_proj, bnb.nn.Linear4bit)
    out = model(torch.tensor([[4, 5, 6]])).logits
    assert torch.isfinite(out).all()


def test_model_path_errors(tmp_path):
    with pytest.raises(h.UserError, match="--model: .*does not exist"):
        h.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(h.UserError, match="--model: .*does not exist"):
        h.resolve_model_path("missing.gguf")
    assert h.resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    (tmp_path / "empty").mkdir()
    with pytest.raises(h.UserError, match="without config.json"):
        h.resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(h.UserError, match="^--model: cannot load no-such-org/no-such-model"):
        h.load_config("no-such-org/no-such-model")  # offline: one line, no library traceback


def cache_entries(cache):
    """What a cache folder holds besides its lock files (cache_lock's, which stay)."""
    return sorted(name for name in os.listdir(cache) if not name.endswith(".lock"))


def stand_in_for_gguf_loaders(set_attribute, stand_in):
    """convert_gguf's four transformers loaders (tokenizer, config, GGUF model, plain model) each return stand_in();
    set_attribute is monkeypatch.setattr in a test, the builtin setattr in a process of its own."""
    import transformers
    for loader, name in ((transformers.AutoTokenizer, "from_pretrained"), (transformers.AutoConfig, "from_pretrained"),
                         (transformers.AutoModelForCausalLM, "from_pretrained"),
                         (transformers.AutoModelForCausalLM, "from_config")):
        set_attribute(loader, name, lambda *a, **k: stand_in())


def test_gguf_conversion_keeps_the_one_another_process_finished_first(tmp_path, monkeypatch):
    """torchrun starts every rank on a new .gguf at once: each converts it, and the first to finish may already be
    loading its folder when the next one finishes. The later one keeps that folder instead of swapping it away."""
    gguf_file, cache = tmp_path / "m.gguf", tmp_path / "cache"
    gguf_file.write_bytes(b"GGUF")
    theirs = cache / f"m-{h.sha256_file(str(gguf_file))[:12]}"

    class StandIn:  # the tokenizer, the config, the GGUF model and the plain model: each writes one file
        def save_pretrained(self, folder):
            with open(os.path.join(folder, "tokenizer.json"), "w") as f:
                f.write("{}")

        def state_dict(self):
            return {}

        def __call__(self, text, **kwargs):  # as a tokenizer: one that reads text back
            return {"input_ids": text}

        def decode(self, ids):
            return ids

        def load_state_dict(self, state):  # the other rank's conversion lands while this one works
            theirs.mkdir(parents=True)
            (theirs / "config.json").write_text('{"winner": true}')

    monkeypatch.setenv("SAFE_FT_CACHE", str(cache))
    stand_in_for_gguf_loaders(monkeypatch.setattr, StandIn)
    assert h.convert_gguf(str(gguf_file)) == str(theirs)
    assert json.loads((theirs / "config.json").read_text()) == {"winner": True}  # untouched
    assert os.listdir(theirs) == ["config.json"] and cache_entries(cache) == [theirs.name]  # no temporary folder left


CONVERT_IN_A_PROCESS = """
import os, sys, time
import safeft
from test_safeft import stand_in_for_gguf_loaders
gguf_file, go = sys.argv[1:]


class StandIn:  # a conversion that takes a second, so that the two processes overlap
    def save_pretrained(self, folder):
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{}")

    def state_dict(self):
        time.sleep(1)
        return {}

    def load_state_dict(self, state):
        pass


stand_in_for_gguf_loaders(setattr, StandIn)
safeft.tokenizer_reads_text = lambda folder: os.path.isfile(os.path.join(folder, "config.json"))
while not os.path.exists(go):  # both start converting at the same moment
    time.sleep(0.01)
print(safeft.convert_gguf(gguf_file))
"""


@pytest.mark.skipif(importlib.util.find_spec("fcntl") is None, reason="no file locks here (Windows)")
def test_processes_started_together_convert_a_gguf_once(tmp_path):
    """torchrun starts every rank at once, and each converted the GGUF itself: N times the memory and disk of one
    conversion (2.5 GB of float32 for the 0.5B model) on a machine with N GPUs. Now one converts, the others wait
    for it and load its folder."""
    gguf_file, go, cache = tmp_path / "m.gguf", tmp_path / "go", tmp_path / "cache"
    gguf_file.write_bytes(b"GGUF")
    env = dict(os.environ, SAFE_FT_CACHE=str(cache), PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    ranks = [subprocess.Popen([sys.executable, "-c", CONVERT_IN_A_PROCESS, str(gguf_file), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    results = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], results
    folders = {out.strip() for out, _ in results}
    assert len(folders) == 1 and cache_entries(cache) == [os.path.basename(folders.pop())]
    assert sum(err.count("converting ") for _, err in results) == 1, results


def test_a_converted_model_loads_from_a_cache_where_no_lock_file_can_be_made(tmp_path, monkeypatch):
    """A cache someone else filled (read-only for this user, or a mount without locks) still serves its models."""
    import builtins
    gguf_file, cache = tmp_path / "m.gguf", tmp_path / "cache"
    gguf_file.write_bytes(b"GGUF")
    done = cache / f"m-{h.sha256_file(str(gguf_file))[:12]}"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    monkeypatch.setenv("SAFE_FT_CACHE", str(cache))
    monkeypatch.setattr(h, "tokenizer_reads_text", lambda folder: True)

    def no_lock_files(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(h, "open", no_lock_files, raising=False)
    assert h.convert_gguf(str(gguf_file)) == str(done)


def test_a_converted_tokenizer_that_garbles_text_is_converted_again_or_refused(tmp_path, monkeypatch):
    """transformers 5.5 converted SmolLM2's GGUF tokenizer into one that puts <|endoftext|> for every space: the
    chain ran on garbage without an error, and the cache kept it after an upgrade."""
    from tokenizers import decoders
    good, bad = tmp_path / "good", tmp_path / "bad"
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(good)
    tokenizer.backend_tokenizer.decoder = decoders.WordPiece()  # gives the byte-level pieces back raw
    tokenizer.save_pretrained(bad)
    assert h.tokenizer_reads_text(str(good)) and not h.tokenizer_reads_text(str(bad))
    assert not h.tokenizer_reads_text(str(tmp_path / "none"))

    gguf_file, cache, calls = tmp_path / "m.gguf", tmp_path / "cache", []
    gguf_file.write_bytes(b"GGUF")

    class StandIn:
        def save_pretrained(self, folder):
            with open(os.path.join(folder, "config.json"), "w") as f:
                f.write("{}")

        def state_dict(self):
            calls.append("converted")
            return {}

        def load_state_dict(self, state):
            pass

    monkeypatch.setenv("SAFE_FT_CACHE", str(cache))
    stand_in_for_gguf_loaders(monkeypatch.setattr, StandIn)
    monkeypatch.setattr(h, "tokenizer_reads_text", lambda folder: True)
    target = h.convert_gguf(str(gguf_file))
    assert h.convert_gguf(str(gguf_file)) == target and calls == ["converted"]  # once
    verdicts = iter([False, True])  # the cached conversion garbles (an older transformers), the new one reads text
    monkeypatch.setattr(h, "tokenizer_reads_text", lambda folder: next(verdicts))
    assert h.convert_gguf(str(gguf_file)) == target and calls == ["converted"] * 2
    assert cache_entries(cache) == [os.path.basename(target)]
    os.makedirs(os.path.join(target, "kept"))  # a marker: a refused conversion must not touch the cached folder
    monkeypatch.setattr(h, "tokenizer_reads_text", lambda folder: False)  # this transformers garbles every time
    with pytest.raises(h.UserError, match=r"^--model: transformers \S+ converts the tokenizer of .*m.gguf into one "
                                          r"that garbles text"):
        h.convert_gguf(str(gguf_file))
    assert cache_entries(cache) == [os.path.basename(target)] and os.path.isdir(os.path.join(target, "kept"))


def test_gguf_conversion_is_keyed_by_the_files_bytes_not_its_place(tmp_path, monkeypatch):
    """An embedded model's GGUF lies in a venv: each new venv used to convert it again (0.5 GB a time)."""
    converted = []

    class StandIn:
        def save_pretrained(self, folder):
            with open(os.path.join(folder, "config.json"), "w") as f:
                f.write("{}")

        def state_dict(self):
            converted.append(1)
            return {}

        def load_state_dict(self, state):
            pass

    monkeypatch.setenv("SAFE_FT_CACHE", str(tmp_path / "cache"))
    stand_in_for_gguf_loaders(monkeypatch.setattr, StandIn)
    monkeypatch.setattr(h, "tokenizer_reads_text", lambda folder: True)
    first, second = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF weights")
    os.utime(second, (1, 1))
    assert h.convert_gguf(str(first)) == h.convert_gguf(str(second)) and len(converted) == 1
    second.write_bytes(b"GGUF other weights")  # other bytes at a known place: converted anew
    assert h.convert_gguf(str(second)) != h.convert_gguf(str(first)) and len(converted) == 2


def test_a_write_that_would_fill_the_disk_is_refused_before_it_starts(tmp_path, monkeypatch, fake_parts, capsys):
    """The float32 conversion of the embedded model is 2.5 GB, its assembled GGUF 0.5 GB: with no room, one line
    naming the cache and SAFE_FT_CACHE, and nothing written; a disk that fills anyway is one line, exit 1."""
    import collections

    class StandIn:
        def save_pretrained(self, folder):
            raise AssertionError("wrote with no room")

        def state_dict(self):
            return {"w": torch.zeros(1000, 1000)}  # 4 MB in float32

    cache = tmp_path / "cache"  # fake_parts set SAFE_FT_CACHE to it
    stand_in_for_gguf_loaders(monkeypatch.setattr, StandIn)
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    free = [52_000_000]  # room for the GGUF itself (checked before it loads), not for its float32 weights
    monkeypatch.setattr(h.shutil, "disk_usage", lambda folder: collections.namedtuple("u", "free")(free[0]))
    with pytest.raises(h.UserError, match=r"^--model: converting .*m.gguf to float32 needs about 54 MB in .*cache, "
                                          r"which has 52 MB free \(free some space, or set SAFE_FT_CACHE"):
        h.convert_gguf(str(gguf_file))
    free[0] = 20_000_000
    monkeypatch.setattr(StandIn, "state_dict", lambda self: pytest.fail("loaded with no room for the GGUF itself"))
    with pytest.raises(h.UserError, match=r"^--model: converting .*m.gguf needs about 50 MB .* 20 MB free"):
        h.convert_gguf(str(gguf_file))
    with pytest.raises(h.UserError, match=r"^--model fake: assembling its GGUF needs"):
        h.embedded_gguf("fake")
    assert cache_entries(cache) == []
    capsys.readouterr()

    def fills_the_disk(args):
        raise OSError(h.errno.ENOSPC, "No space left on device", str(tmp_path / "out.bin"))
    with pytest.raises(SystemExit) as exit_:
        h.run_main(fills_the_disk, argparse.ArgumentParser(), [])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"error: the disk is full (writing {tmp_path / 'out.bin'})\n"
    from safetensors import SafetensorError

    def adapter_fills_the_disk(args):  # what safetensors raised writing to a full tmpfs: no errno, the OS's words
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    with pytest.raises(SystemExit) as exit_:
        h.run_main(adapter_fills_the_disk, parser, ["--out", "runs/ft"])
    assert exit_.value.code == 1 and capsys.readouterr().err == "error: the disk is full (writing runs/ft)\n"


def test_gguf_that_transformers_cannot_load(tmp_path, monkeypatch):
    import gguf
    path = str(tmp_path / "odd.gguf")
    writer = gguf.GGUFWriter(path, "notanarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setenv("SAFE_FT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(h.UserError, match="--model: transformers cannot load .*odd.gguf"):
        h.load_model(path)
    # a quantisation type the installed gguf cannot de-quantise raises NotImplementedError, a traceback before
    import transformers

    def unknown_type(*args, **kwargs):
        raise NotImplementedError("quantization type 99 is not supported")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unknown_type)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    with pytest.raises(h.UserError, match="cannot load .*odd.gguf .quantization type 99"):
        h.load_model(path)
    # Not a GGUF at all: refused before a conversion is announced, and nothing (not even a lock) left in the cache
    (tmp_path / "junk.gguf").write_text("not a gguf")
    with pytest.raises(h.UserError, match="--model: .*junk.gguf is not a GGUF file"):
        h.load_model(str(tmp_path / "junk.gguf"))
    assert not any("junk" in name for name in os.listdir(tmp_path / "cache"))


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Six installed 'packages' holding the parts of a small file, registered as an embedded model."""
    blob = os.urandom(3000)
    pieces = [blob[i * 500:(i + 1) * 500] for i in range(6)]
    for i, piece in enumerate(pieces, 1):
        folder = tmp_path / "site" / f"fake_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part0{i}.bin").write_bytes(piece)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SAFE_FT_CACHE", str(tmp_path / "cache"))
    import hashlib
    spec = {"what": "test", "packages": [f"fake_part{i}" for i in range(1, 7)],
            "files": [f"data/part0{i}.bin" for i in range(1, 7)], "gguf": "fake.gguf", "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(), "install": "pip install fake-parts"}
    monkeypatch.setitem(h.EMBEDDED_MODELS, "fake", spec)
    return tmp_path, blob, spec


def test_embedded_model_is_assembled_once_and_checked(fake_parts):
    tmp_path, blob, spec = fake_parts
    path = h.embedded_gguf("fake")
    assert open(path, "rb").read() == blob
    assert cache_entries(tmp_path / "cache") == ["fake.gguf"]  # no temporary file left beside it
    mtime = os.stat(path).st_mtime_ns
    assert h.embedded_gguf("fake") == path and os.stat(path).st_mtime_ns == mtime  # once
    os.remove(path)
    spec["sha256"] = "0" * 64
    with pytest.raises(h.UserError, match="--model fake: the parts give 3000 bytes .*reinstall"):
        h.embedded_gguf("fake")
    assert cache_entries(tmp_path / "cache") == []  # a bad assembly leaves nothing behind


def test_embedded_model_names_the_missing_part(fake_parts):
    tmp_path, _, _ = fake_parts
    os.remove(tmp_path / "site" / "fake_part4" / "data" / "part04.bin")
    with pytest.raises(h.UserError, match="--model fake: package fake-part4 is not installed"):
        h.embedded_gguf("fake")


def test_short_names_and_help_list_the_embedded_models():
    import argparse
    parser = argparse.ArgumentParser()
    h.add_common_args(parser, "runs/x", "limit")
    text = parser.format_help()
    assert "qwen-coder-0.5b" in text and "smollm2" in text
    assert parser.parse_args([]).model == h.DEFAULT_MODEL == "qwen-coder-0.5b"


@pytest.mark.embedded
@pytest.mark.parametrize("name, fingerprint, question, expected", [
    ("smollm2", {"model_type": "llama", "num_layers": 30, "hidden_size": 576, "vocab_size": 49152},
     "What is the capital of France?", "Paris"),
    ("qwen-coder-0.5b", {"model_type": "qwen2", "num_layers": 24, "hidden_size": 896, "vocab_size": 151936},
     "What is the capital of France?", "Paris"),
])
def test_embedded_models_load_and_generate_offline(name, fingerprint, question, expected):
    if importlib.util.find_spec(h.EMBEDDED_MODELS[name]["packages"][-1]) is None:
        pytest.skip(f"{name} is not installed ({h.EMBEDDED_MODELS[name]['install']})")
    tokenizer, template = h.load_tokenizer(name)
    model = h.load_model(name)
    assert template == "chat" and h.model_fingerprint(model.config) == fingerprint
    [answer] = h.generate_greedy(model, tokenizer, [question], template, 12)
    assert expected in answer


# -- output files --

def test_write_json_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "out.json"
    h.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        h.write_json_atomic(str(path), {"a": object()})  # not serialisable: fails midway
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with h.atomic_file(str(path), ".png") as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("savefig failed")
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["plot.png"]
    with h.atomic_file(str(path), ".png") as tmp:
        open(tmp, "wb").write(b"new")
    assert path.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["plot.png"]


def test_find_adapter_layouts_and_what_it_refuses(tmp_path):
    def adapter(folder, peft_type="LORA", weights="adapter_model.safetensors"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
        save_file({"w": torch.zeros(2)}, str(folder / weights))
        return folder
    ours = adapter(tmp_path / "ours")
    (ours / "sv_meta.json").write_text('{"format": "security-vectors/v1"}')
    found = h.find_adapter(str(ours), "--adapter")
    assert found["adapter_dir"] == str(ours) and found["meta_file"] == "sv_meta.json"
    assert found["meta"] == {"format": "security-vectors/v1"}
    adapter(tmp_path / "peft" / "default", weights="adapter_model.bin")  # PEFT's one-named-subfolder layout
    found = h.find_adapter(str(tmp_path / "peft"), "--adapter")
    assert found["adapter_dir"] == str(tmp_path / "peft" / "default") and found["meta"] == {}
    adapter(tmp_path / "peft" / "second")
    with pytest.raises(h.UserError, match="^--adapter: no adapter_config.json"):  # two: which one is meant?
        h.find_adapter(str(tmp_path / "peft"), "--adapter")
    (adapter(tmp_path / "empty") / "adapter_model.safetensors").unlink()
    with pytest.raises(h.UserError, match="^--adapter: no adapter_model.safetensors"):
        h.find_adapter(str(tmp_path / "empty"), "--adapter")
    adapter(tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(h.UserError, match="^--adapter: .*ia3 is not a LoRA adapter .*'IA3'"):
        h.find_adapter(str(tmp_path / "ia3"), "--adapter")
    (adapter(tmp_path / "listed") / "adapter_config.json").write_text("[]")  # valid JSON, not an object
    with pytest.raises(h.UserError, match="^--adapter: .*listed is not a LoRA adapter .*not a JSON object"):
        h.find_adapter(str(tmp_path / "listed"), "--adapter")
    (ours / "sv_meta.json").write_text("[1]")
    with pytest.raises(h.UserError, match="^--security-vectors: .*sv_meta.json is not a JSON object"):
        h.find_adapter(str(ours), "--security-vectors")
    with pytest.raises(h.UserError, match="^--adapter: .* is not a folder"):
        h.find_adapter(str(tmp_path / "missing"), "--adapter")
    # weights that cannot be read are one line before any model loads (they were a traceback after it)
    (ours / "sv_meta.json").write_text('{"format": "security-vectors/v1"}')
    weights = ours / "adapter_model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 123\n")  # no git lfs pull
    with pytest.raises(h.UserError, match=r"^--security-vectors: .*adapter_model.safetensors cannot be read "
                                          r"\(a Git LFS pointer, not the weights: run git lfs pull\)"):
        h.find_adapter(str(ours), "--security-vectors")
    save_file({"w": torch.zeros(64)}, str(weights))
    weights.write_bytes(weights.read_bytes()[:-100])  # a cut copy
    with pytest.raises(h.UserError, match=r"^--adapter: .*adapter_model.safetensors cannot be read \(.*"):
        h.find_adapter(str(ours), "--adapter")


def test_read_json_file_names_the_flag_and_the_file(tmp_path):
    bad = tmp_path / "state.json"
    bad.write_text("{oops")
    with pytest.raises(h.UserError, match=r"^--resume: .*state.json is not valid JSON"):
        h.read_json_file(str(bad), "--resume")
    with pytest.raises(h.UserError, match=r"^--resume: cannot read .*missing.json"):
        h.read_json_file(str(tmp_path / "missing.json"), "--resume")
    bad.write_text('{"a": [1]}')
    assert h.read_json_file(str(bad), "--resume") == {"a": [1]}


def test_commit_dir_and_overwrite_check(tmp_path):
    target = tmp_path / "adapter"
    for content in ("one", "two"):
        with h.output_dir(str(target), overwrite=True) as tmp:
            (tmp_path / os.path.basename(tmp) / "f.txt").write_text(content)
    assert (target / "f.txt").read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    with pytest.raises(h.UserError, match="--out: .* already exists"):
        h.check_output_location(str(target), overwrite=False, is_dir=True)
    h.check_output_location(str(target), overwrite=True, is_dir=True)


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    """Two runs given the same --out: the start-up check passes for both, the second commit must refuse."""
    out_file, out_dir = tmp_path / "eval.json", tmp_path / "adapter"
    h.check_output_location(str(out_file), overwrite=False)
    h.check_output_location(str(out_dir), overwrite=False, is_dir=True)
    h.write_json_atomic(str(out_file), {"run": 1}, overwrite=False)  # the other run finished first
    with pytest.raises(h.UserError, match="appeared while this run worked"):
        h.write_json_atomic(str(out_file), {"run": 2}, overwrite=False)
    assert json.loads(out_file.read_text()) == {"run": 1}
    with h.output_dir(str(out_dir), overwrite=False) as tmp:
        (tmp_path / os.path.basename(tmp) / "f.txt").write_text("first")
    with pytest.raises(h.UserError, match="appeared while this run worked"):
        with h.output_dir(str(out_dir), overwrite=False) as tmp:
            (tmp_path / os.path.basename(tmp) / "f.txt").write_text("second")
    assert (out_dir / "f.txt").read_text() == "first"
    assert sorted(os.listdir(tmp_path)) == ["adapter", "eval.json"]  # no temporary left either way


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_folder_is_found_before_the_work(tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        with pytest.raises(h.UserError, match="is not writable"):
            h.check_output_location(str(tmp_path / "ro" / "x.json"), overwrite=False)
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_unusable_output_locations_are_found_before_the_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(h.UserError, match="^--out: cannot write .*file is a file"):
        h.check_output_location(str(tmp_path / "file" / "sub" / "x.json"), overwrite=False)
    with pytest.raises(h.UserError, match="^--out: .*names a folder; give a file name"):
        h.check_output_location(str(tmp_path / "some_dir") + "/", overwrite=False)
    for overwrite in (True, False):  # without --overwrite it said to pass --overwrite, which then refused it
        with pytest.raises(h.UserError, match="^--checkpoint-dir: .* exists and is a file"):
            h.check_output_location(str(tmp_path / "file"), overwrite, flag="--checkpoint-dir", is_dir=True)
    # A folder that no one may write into, not even root (os.access says yes to root there): found by trying.
    if os.path.isdir("/proc/self"):
        with pytest.raises(h.UserError, match="^--out: cannot write /proc/x/y.json: /proc is not writable"):
            h.check_output_location("/proc/x/y.json", overwrite=False)
    # The write-permission test itself (root ignores modes, so it is exercised through os.access).
    monkeypatch.setattr(h.os, "access", lambda path, mode: False)
    with pytest.raises(h.UserError, match="^--out: cannot write .* is not writable"):
        h.check_output_location(str(tmp_path / "new.json"), overwrite=False)


def test_an_output_that_is_or_holds_an_input_is_refused_with_overwrite(tmp_path):
    """--overwrite replaces the whole old --out: a folder holding the run's --data deleted the data."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.jsonl").write_text("{}")
    args = argparse.Namespace(data=str(project / "train.jsonl"), out=str(project), model="not-a-path", limit=None,
                              adapter=[str(tmp_path / "missing"), str(project / "train.jsonl")])
    inputs = h.given_paths(args, "out")
    assert inputs == [("--data", str(project / "train.jsonl")), ("--adapter", str(project / "train.jsonl"))]
    with pytest.raises(h.UserError, match=r"^--out: .*project holds --data .*train.jsonl, which --overwrite would "):
        h.check_output_location(str(project), True, is_dir=True, inputs=inputs)
    with pytest.raises(h.UserError, match=r"^--out: .*train.jsonl is --data .*train.jsonl"):
        h.check_output_location(str(project / "train.jsonl"), True, inputs=inputs)
    h.check_output_location(str(tmp_path / "elsewhere"), True, is_dir=True, inputs=inputs)
    (tmp_path / "project-2").mkdir()  # a sibling whose name starts the same is not inside
    h.check_output_location(str(tmp_path / "project-2"), True, is_dir=True, inputs=inputs)
    with pytest.raises(h.UserError, match=r"^--plot: b.png is also --out; give each output its own name"):
        h.check_distinct_outputs([("--out", "b.png"), ("--plot", "b.png")])


def test_flags_a_run_ignores_are_named(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None)
    h.unused_flags(parser.parse_args(["--lora-r", "16"]), parser, ["lora_r", "load_in_4bit"], "here")
    assert capsys.readouterr().err == ""  # a default, even typed out, is not a setting that goes unused
    h.unused_flags(parser.parse_args(["--lora-r", "64", "--no-load-in-4bit"]), parser, ["lora_r", "load_in_4bit"],
                   "with --method full")
    assert capsys.readouterr().err == "warning: --lora-r, --no-load-in-4bit are not used with --method full\n"
    with pytest.raises(h.UserError, match="^--lora-r: not used with --compare$"):
        h.unused_flags(parser.parse_args(["--lora-r", "8"]), parser, ["lora_r"], "with --compare", error=True)


def test_a_model_that_is_not_a_causal_lm_is_one_line_from_its_config(tmp_path):
    from transformers import DistilBertConfig
    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(
        tmp_path / "encoder")  # was a traceback listing some 200 model classes, from every script
    with pytest.raises(h.UserError, match=r"^--model: .*encoder is a distilbert model, not a causal language model"):
        h.load_config(str(tmp_path / "encoder"))


@pytest.mark.parametrize("script", ["locate_layers", "train_sv", "finetune", "evaluate"])
def test_a_bad_flag_value_is_one_line_not_the_usage_block(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        module.main(["--seed", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err  # argparse printed about 20 lines of usage first
    assert err[0].startswith(f"{script}.py: error: argument --seed: must be >= 0")


@pytest.mark.parametrize("script, flags, warning", [  # each was ignored without a word
    ("finetune", ["--keep-checkpoints", "5"], "--keep-checkpoints is not used without --save-every"),
    ("train_sv", ["--resume", "old-vectors", "--lora-r", "4"], "--lora-r is not used with --resume"),
    ("train_sv", ["--check-limit", "0", "--check-max-new-tokens", "9"],
     "--check-max-new-tokens is not used with --check-limit 0"),
    ("locate_layers", ["--scale", "1.2", "--scale-step", "0.1"], "--scale-step is not used with a fixed --scale 1.2"),
    ("evaluate", ["--skip-task", "--task-max-new-tokens", "9"], "--task-max-new-tokens is not used without the task"),
    ("evaluate", ["--no-response-loss", "--max-length", "64"], "--max-length is not used with --no-response-loss"),
])
def test_flags_a_script_ignores_get_a_warning(script, flags, warning, tmp_path, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):  # the missing model stops the run after the flags are checked
        module.main([*flags, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")])
    assert f"warning: {warning}" in capsys.readouterr().err


def test_sppft_freezes_all_of_attention_and_mlp_and_trains_the_blocks_norms():
    from transformers import LlamaConfig, Qwen3Config
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    for config in (LlamaConfig(**shape), Qwen3Config(**shape, head_dim=8)):
        block = h.decoder_layers(h.meta_model(config))[0]
        frozen = {name for name, _ in h.sppft_frozen_weights(block)}
        trained = {name for name, _ in block.named_parameters()} - frozen
        assert trained == {"input_layernorm.weight", "post_attention_layernorm.weight"}
        assert all(name.startswith(("self_attn.", "mlp.")) for name in frozen)
    assert {"self_attn.q_norm.weight", "self_attn.k_norm.weight"} <= frozen  # Qwen3's: trained before


def test_paired_change_matches_the_same_prompt_on_the_same_line():
    def records(classes, prompt="p"):
        return [{"line": n, "prompt": f"{prompt}{n}", "class": c} for n, c in enumerate(classes, 1)]
    attacked = records(["complied_with_content"] * 6 + ["refused"] * 2)
    defended = records(["refused"] * 6 + ["complied_with_content", "complied_no_content"])
    change = h.paired_change(defended, attacked, "harmful_rate")
    assert change == {"n": 8, "more": 1, "fewer": 6, "p": pytest.approx(2 * 8 / 128)}  # exact: 2 x P(X <= 1 | 7)
    assert h.paired_change(defended, attacked, "any_compliance_rate")["more"] == 2
    assert h.paired_change(defended[:3], attacked, "refusal_rate") == {"n": 3, "more": 3, "fewer": 0, "p": 0.25}
    # other prompts on the same lines (another data file) are not pairs
    assert h.paired_change(records(["refused"] * 8, prompt="q"), attacked, "harmful_rate") is None


def test_leftovers_of_a_killed_run_are_removed(tmp_path, monkeypatch):
    """kill -9 while saving leaves .tmp-<pid>-<host>-* behind; the next run's check removes those of dead processes
    on this host, and leaves another host's alone (a shared file system: its pid means nothing here) and another
    user's running process's."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = h._host_tag()
    (tmp_path / f".tmp-{dead}-{host}-adapter-abc").mkdir()
    (tmp_path / f".tmp-{dead}-{host}-adapter-abc" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / f".tmp-{dead}-{host}-eval.json-x.json").write_text("{")
    kept = [f".tmp-{os.getpid()}-{host}-live",  # a running process's work in progress
            f".tmp-{dead}-other_node-adapter-def"]  # another machine saving into the same folder
    for name in kept:
        (tmp_path / name).mkdir()
    real_kill = os.kill

    def kill(pid, signal):  # pid 1 stands for a process of another user: alive, but not ours to signal
        if pid == 1:
            raise PermissionError
        return real_kill(pid, signal)

    kept.append(f".tmp-1-{host}-adapter-ghi")
    (tmp_path / kept[-1]).mkdir()
    monkeypatch.setattr(h.os, "kill", kill)
    h.check_output_location(str(tmp_path / "adapter"), overwrite=False, is_dir=True)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    # what this process writes carries the same tag, so a later run here can clean it up
    with h.atomic_file(str(tmp_path / "x.json")) as tmp:
        assert os.path.basename(tmp).startswith(f".tmp-{os.getpid()}-{host}-x.json-")


def test_leftovers_stay_where_a_pid_cannot_be_probed(tmp_path, monkeypatch):
    """On Windows os.kill(pid, 0) is no probe: it sends Ctrl-C to that process. There the leftovers stay."""
    monkeypatch.setattr(h, "PROBE_PIDS", False)
    monkeypatch.setattr(h.os, "kill", lambda *a: pytest.fail("os.kill called"))
    (tmp_path / f".tmp-999999999-{h._host_tag()}-adapter-abc").mkdir()
    h.check_output_location(str(tmp_path / "adapter"), overwrite=False, is_dir=True)
    assert os.listdir(tmp_path) == [f".tmp-999999999-{h._host_tag()}-adapter-abc"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_outputs_follow_the_umask(tmp_path, umask):
    """mkstemp/mkdtemp make private entries; outputs must get the modes open()/mkdir() would give."""
    old = os.umask(umask)
    try:
        h.write_json_atomic(str(tmp_path / "out.json"), {"a": 1})
        with h.output_dir(str(tmp_path / "adapter"), overwrite=False) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            for name in ("f.bin", os.path.join("sub", "g.bin")):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write("x")
                os.chmod(os.path.join(tmp, name), 0o600)
    finally:
        os.umask(old)
    def mode(p):
        return os.stat(p).st_mode & 0o777
    assert mode(tmp_path / "out.json") == 0o666 & ~umask
    assert mode(tmp_path / "adapter") == 0o777 & ~umask
    assert mode(tmp_path / "adapter" / "sub") == 0o777 & ~umask
    assert mode(tmp_path / "adapter" / "f.bin") == 0o666 & ~umask
    assert mode(tmp_path / "adapter" / "sub" / "g.bin") == 0o666 & ~umask


def test_peak_memory_is_this_process_not_a_big_parent(tmp_path):
    """getrusage's ru_maxrss survives vfork + exec, so a script started by a big process (a notebook kernel,
    a benchmark) would report the parent's peak; peak_memory_mb must report its own."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("VmHWM is Linux-only")

    def resident_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    now = resident_mb()
    peak, kind = h.peak_memory_mb("cpu")
    assert kind == "cpu_peak_rss" and peak >= now - 1  # the peak covers at least what is resident now
    child = tmp_path / "child.py"
    child.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\nimport resource\nfrom safeft import peak_memory_mb\n"
                     "print(peak_memory_mb('cpu')[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    big = "x = bytearray(2048 * 2 ** 20); x[::4096] = b'\\1' * len(x[::4096])\n" \
          f"import subprocess, sys; sys.stdout.write(subprocess.run([sys.executable, {str(child)!r}], " \
          "capture_output=True, text=True, check=True).stdout)"
    ours, inherited = map(float, subprocess.run([sys.executable, "-c", big], capture_output=True, text=True,
                                                 check=True).stdout.split())
    # Here the child's ru_maxrss holds the parent's 2 GiB (what the old getrusage-based figure reported);
    # the child itself (python + torch) is far smaller.
    assert ours < 1500 and ours < inherited


def test_run_main_closes_the_process_group_that_a_run_opened(tmp_path):
    """Under torchrun a process whose group is left to the interpreter's exit was sometimes aborted by gloo's
    threads (about 1 run in 10 of the two-process tests); run_main closes it, also after a user error."""
    import argparse

    import torch.distributed as dist

    def opens_a_group(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store-{args.n}", rank=0, world_size=1)
        if args.n:
            raise h.UserError("bad input")
        return dist.is_initialized()

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=0)
    assert h.run_main(opens_a_group, parser, []) is True and not dist.is_initialized()
    with pytest.raises(SystemExit):
        h.run_main(opens_a_group, parser, ["--n", "1"])
    assert not dist.is_initialized()
    # A group the caller opened before main() (a notebook's or a launcher's own) is left for the caller to close.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store-caller", rank=0, world_size=1)
    try:
        assert h.run_main(lambda args: dist.is_initialized(), parser, []) is True and dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_run_main_quiets_the_libraries_only_while_it_runs():
    """A notebook that calls main() keeps its own logging, warnings and progress bars afterwards."""
    import argparse
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    logger, seen = logging.getLogger("transformers"), {}
    level, bars = logger.level, hf_logging.is_progress_bar_enabled()

    def procedure(args):
        seen.update(level=logger.level, bars=hf_logging.is_progress_bar_enabled())
        warnings.warn("a library's deprecation", FutureWarning, stacklevel=2)
        raise h.UserError("bad input")

    logger.setLevel(logging.INFO)
    hf_logging.enable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            filters = list(warnings.filters)
            with pytest.raises(SystemExit):
                h.run_main(procedure, argparse.ArgumentParser(), [])
            assert not shown  # quiet while it ran
            assert warnings.filters == filters and logger.level == logging.INFO
            assert hf_logging.is_progress_bar_enabled()
        assert seen == {"level": logging.ERROR, "bars": False}
    finally:
        logger.setLevel(level)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_quiet_libraries_holds_in_a_process_that_has_not_imported_transformers_yet():
    """transformers sets its logger's level at its first logging call: a level set before that is overwritten,
    and its warnings (transformers 5.24: 'past_key_values ... deprecated' in every locate_layers.py run) showed."""
    code = ("import safeft; restore = safeft.quiet_libraries()\n"
            "from transformers.utils import logging\n"
            "from huggingface_hub.utils import logging as hub_logging\n"
            "logging.get_logger('transformers.models').warning('library noise')\n"
            "hub_logging.get_logger('huggingface_hub.utils._http').warning('hub retry noise')\n"
            "restore(); logging.get_logger('transformers.models').warning('shown again')\n"
            "hub_logging.get_logger('huggingface_hub.utils._http').warning('hub shown again')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "library noise" not in result.stderr and "shown again" in result.stderr
    # an unreachable hub id: one warning per retry came before our one-line error
    assert "hub retry noise" not in result.stderr and "hub shown again" in result.stderr


def test_report_to_is_checked_at_the_flag(monkeypatch, capsys):
    """A name the Trainer does not know, or whose package is missing, stopped the run with a traceback after the
    weights had loaded; now it is one line naming --report-to, exit 2, before anything loads."""
    import argparse

    from transformers.integrations import integration_utils

    import finetune
    import train_sv
    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: ["tensorboard"])
    assert h.report_targets("none") == "none" and h.report_targets("all") == "all"
    assert h.report_targets(" tensorboard ") == ["tensorboard"]  # a list: the Trainer takes one
    for text, why in [("tensorboard,wandb", "wandb: its package is not installed"),
                      ("tensorbord", "'tensorbord' is not a logging integration"), ("", "'' is not"),
                      ("none,tensorboard", "none stands alone, not in a list")]:  # said 'none' was not a name
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            h.report_targets(text)
    for script in (finetune, train_sv):
        with pytest.raises(SystemExit) as stop:
            script.main(["--report-to", "wandb", "--model", "/no/such/model"])
        assert stop.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            "argument --report-to: wandb: its package is not installed here")
    # The check imports transformers' integrations, and through them bitsandbytes, which logs a failed kernel
    # download at import on some machines (this one): in a fresh process, nothing but our line may show.
    code = ("import argparse, safeft\ntry:\n    safeft.report_targets('tensorbord')\n"
            "except argparse.ArgumentTypeError:\n    pass")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_main_called_bare_in_a_notebook_runs_with_the_defaults(monkeypatch):
    """A kernel's own arguments (-f kernel.json) would be an argparse error; a script's are the user's."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=7)
    for launcher in ("/usr/lib/python3/site-packages/ipykernel_launcher.py", "/usr/local/colab_kernel_launcher.py"):
        monkeypatch.setattr(sys, "argv", [launcher, "-f", "/root/.local/share/jupyter/runtime/kernel-1.json"])
        assert h.run_main(lambda args: args.n, parser, None) == 7
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--n", "3"])
    assert h.run_main(lambda args: args.n, parser, None) == 3
    assert h.run_main(lambda args: args.n, parser, ["--n", "4"]) == 4


def test_common_args_help_shows_defaults():
    import argparse
    parser = argparse.ArgumentParser(formatter_class=h.HelpFormatter)
    h.add_common_args(parser, "runs/x.json", "limit")
    text = parser.format_help()
    for flag in ("--model", "--template", "--load-in-4bit", "--seed", "--out", "--overwrite", "--limit",
                 "--label-field"):
        assert flag in text
    assert "runs/x.json" in text and "(default: 0)" in text
    args = parser.parse_args([])
    assert args.load_in_4bit is None and args.template == "auto"
    assert "evaluate.py what its adapters or fine-tuned model recorded" in " ".join(text.split())
    # numpy's seeding takes 0 to 2**32 - 1: the rest was a ValueError traceback when the run seeded, not exit 2
    assert parser.parse_args(["--seed", str(2 ** 32 - 1)]).seed == 2 ** 32 - 1
    for bad in ("-1", str(2 ** 32)):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["--seed", bad])
        assert stop.value.code == 2


def test_no_script_help_shows_a_bare_none_default():
    """finetune.py's --help read '--lr LR  peak AdamW learning rate (default: None)'."""
    import evaluate
    import finetune
    import locate_layers
    import train_sv
    for script in (locate_layers, train_sv, finetune, evaluate):
        text = " ".join(script.build_parser().format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, script.__name__
        assert "(default: 0.0)" in text or script is not train_sv  # 0.0 is shown: "is None", not "== None"
    assert "peak AdamW learning rate; unset = 0.0002 with --method lora, 2e-05 with --method full" in " ".join(
        finetune.build_parser().format_help().split())


@pytest.mark.parametrize("parse, good, bad", [
    (h.positive_int, "3", ["0", "-1", "x", "1.5"]),
    (h.positive_float, "0.5", ["0", "-2", "nan", "x", "inf", "1e999"]),  # inf: an 'inf' --lr trained NaN weights
    (h.fraction, "0", ["1", "-0.1"]),
    (h.non_negative_float, "0", ["-1e-9", "inf"]),
])
def test_flag_validators_reject_settings_that_cannot_train(parse, good, bad):
    import argparse
    parse(good)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_layer_ranges():
    assert h.parse_layer_range("6-12", "--x") == (6, 12) and h.parse_layer_range("7", "--x") == (7, 7)
    for text in ("12-6", "a-b", "1-2-3", "-3"):
        with pytest.raises(h.UserError, match="^--freeze-layers: "):
            h.parse_layer_range(text, "--freeze-layers")
    with pytest.raises(h.UserError, match="outside this model, which has layers 0-3"):
        h.check_layers_within(2, 4, 4, "--freeze-layers")


def test_pip_install_makes_the_module_and_the_scripts_importable_anywhere(tmp_path):
    """pyproject.toml's promise to notebook users (`pip install git+<repo>`): the module and the four scripts
    import from any folder, `main([...])` runs, and every default data file is installed with them (a bare
    `main()` reads them). Installed from a copy, so the checkout gets no build files."""
    import shutil
    source, site, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "notebook"
    source.mkdir()
    elsewhere.mkdir()
    modules = ["safeft", "safeft_judge", "locate_layers", "train_sv", "finetune", "evaluate"]
    for name in ["pyproject.toml", "README.md"] + [m + ".py" for m in modules]:
        shutil.copy(os.path.join(ROOT, name), source)
    shutil.copytree(os.path.join(ROOT, "data"), source / "data")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, text=True)
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    print(importlib.import_module(name).__file__)\n"
            "import argparse, os, locate_layers, train_sv, finetune, evaluate\n"
            "for script in (locate_layers, train_sv, finetune, evaluate):\n"
            "    for action in script.build_parser()._actions:\n"
            "        if isinstance(action.default, str) and action.default.endswith('.jsonl'):\n"
            "            print('data', action.dest, os.path.isfile(action.default), action.default)\n"
            "from finetune import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    print('exit', e.code)\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    files = done.stdout.splitlines()[:len(modules)]
    assert [os.path.dirname(f) for f in files] == [str(site)] * len(modules), files
    assert "--micro-batch-size" in done.stdout and done.stdout.rstrip().endswith("exit 0")
    defaults = [line.split() for line in done.stdout.splitlines() if line.startswith("data ")]
    assert len(defaults) >= 9, defaults  # locate 3, train_sv 2, finetune 1, evaluate 3
    assert all(found == "True" and path.startswith(str(site)) for _, _, found, path in defaults), defaults


def test_declared_version_floors_are_the_tested_ones():
    """requirements.txt and pyproject.toml declare the same ranges, and each lower bound is exactly the version
    requirements-floor.txt pins (the set `make test-floor` runs the suite on): a bound moved in one place only, or
    raised without the floor run, fails here."""
    import re

    from packaging.version import Version

    def bounds(lines):
        found = {}
        for line in lines:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", line.split("#")[0].strip())
            if match:
                found[match[1].lower()] = match[2].replace(" ", "")
        return found

    with open(os.path.join(ROOT, "requirements.txt")) as f:
        required = bounds(f)
    with open(os.path.join(ROOT, "pyproject.toml")) as f:  # tomllib is 3.11+, and this list is plain
        declared = bounds(re.findall(r'"([^"]+)"', re.search(r"(?s)\ndependencies = \[(.*?)\]", f.read())[1]))
    with open(os.path.join(ROOT, "requirements-floor.txt")) as f:
        floor = bounds(f)
    assert declared == {k: v for k, v in required.items() if k != "torch"}  # torch: the user installs their build
    lower = {name: Version(re.search(r">=([^,]+)", spec)[1]) for name, spec in declared.items()}
    assert {name: Version(pin.removeprefix("==")) for name, pin in floor.items()} == lower
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert "requirements-floor.txt" in f.read()


def test_scripts_import_only_the_shared_module_and_have_a_guarded_main():
    """One importable module holds what the scripts share; scripts talk to each other only through files."""
    import ast
    ours = {"safeft", "safeft_judge", "locate_layers", "train_sv", "finetune", "evaluate", "demo"}
    for name in ("locate_layers.py", "train_sv.py", "finetune.py", "evaluate.py"):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        # evaluate.py also has its judge module (the answer rules and the judge model), which only it uses
        assert imported & ours == ({"safeft", "safeft_judge"} if name == "evaluate.py" else {"safeft"}), name
        main = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert main and main[0].args.args[0].arg == "argv" and main[0].args.defaults, name
        assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body), name


def test_a_run_prints_our_lines_and_bars_not_library_warnings(tmp_path):
    """bitsandbytes logs a failed optional kernel download at import on AVX-512 CPUs, transformers and peft
    warn about deprecations: a user reads those as errors. A 4-bit training run shows none of them."""
    from conftest import make_tiny_model, write_jsonl
    model = make_tiny_model("llama", tmp_path / "m", hidden=64)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "how do i make bread ?", "response": "here is a recipe"},
                                              {"prompt": "tell me a story", "response": "once there was a cake"}])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), "--model", model, "--data", data,
                             "--load-in-4bit", "--max-steps", "2", "--out", str(tmp_path / "ft")],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.strip() for line in (result.stdout + result.stderr).replace("\r", "\n").splitlines()]
    noise = [line for line in lines if any(word in line.lower() for word in
                                           ("warn", "deprecat", "kernels-community", "traceback", "future"))]
    assert noise == []
    assert f"wrote {tmp_path / 'ft'}" in result.stdout


def test_the_module_holds_only_what_two_or_more_scripts_use():
    """What one script alone uses lives in that script; a name here serves two or more of them, or is a part of
    something here that does. safeft_judge.py counts as evaluate.py, the one script it serves."""
    import ast
    import re
    tree = ast.parse(open(os.path.join(ROOT, "safeft.py")).read())
    defined = {getattr(target, "id", getattr(target, "name", None))
               for node in tree.body for target in (node.targets if isinstance(node, ast.Assign) else [node])} - {None}
    # read (not assigned) by another top-level definition: a function calling itself does not count
    used_inside = {n.id for node in tree.body for n in ast.walk(node)
                   if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id != getattr(node, "name", None)}
    users = {}
    for script, files in {"locate_layers": ["locate_layers.py"], "train_sv": ["train_sv.py"],
                          "finetune": ["finetune.py"], "evaluate": ["evaluate.py", "safeft_judge.py"],
                          "demo": ["demo.py"]}.items():
        text = "".join(open(os.path.join(ROOT, f)).read() for f in files)
        for name in defined:
            if re.search(rf"(safeft\.|import [^\n]*\b){name}\b", text):
                users.setdefault(name, set()).add(script)
    lonely = {name: sorted(users.get(name, ())) for name in defined
              if len(users.get(name, ())) < 2 and name not in used_inside}
    assert lonely == {}


@pytest.mark.parametrize("gpu, dtype, mixed", [(None, torch.float32, None), ((7, 5), torch.float16, "fp16"),
                                                ((6, 0), torch.float16, "fp16"), ((8, 0), torch.bfloat16, "bf16"),
                                                ((9, 0), torch.bfloat16, "bf16")])
def test_emulated_bf16_gpus_run_in_fp16(gpu, dtype, mixed, monkeypatch):
    # A T4 (7.5) or P100 (6.0) answers torch.cuda.is_bf16_supported() with True: bf16 emulated in float32, several
    # times slower. They ran the model in bf16 and trained with bf16 autocast; now fp16 with loss scaling.
    import transformers

    import finetune
    assert transformers.TrainingArguments  # loaded before "CUDA": its import would load bitsandbytes' GPU code
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 says
    monkeypatch.setattr(torch.version, "hip", None)
    # sys.modules': transformers' lazy module puts another object there once something is loaded from it
    monkeypatch.setattr(sys.modules["transformers"], "TrainingArguments",
                        lambda **settings: argparse.Namespace(world_size=1, n_gpu=1, **settings))
    assert h.pick_device_and_dtype() == ("cuda" if gpu else "cpu", dtype)
    settings = h.training_arguments(finetune.build_parser().parse_args([]), "unused")
    assert (settings.bf16, settings.fp16) == (mixed == "bf16", mixed == "fp16")


def test_a_cache_that_cannot_be_written_is_one_line_before_the_conversion(tmp_path, monkeypatch, fake_parts):
    # SAFE_FT_CACHE on a read-only mount (a Kaggle input data set) or below a file: a traceback from os.makedirs
    # (or from the first write, after the 30 s GGUF load) before; now a UserError before anything loads.
    gguf_file, blocker = tmp_path / "m.gguf", tmp_path / "a-file"
    gguf_file.write_bytes(b"GGUF")
    blocker.write_text("mine")
    monkeypatch.setenv("SAFE_FT_CACHE", str(blocker / "cache"))
    stand_in_for_gguf_loaders(monkeypatch.setattr, lambda: pytest.fail("loaded before the cache was checked"))
    for make in (lambda: h.convert_gguf(str(gguf_file)), lambda: h.embedded_gguf("fake")):
        with pytest.raises(h.UserError, match=rf"cannot write in {re.escape(str(blocker))}.*SAFE_FT_CACHE"):
            make()
    assert blocker.read_text() == "mine"


def test_length_grouped_order_after_the_first_epoch_is_the_seeds_alone(tmp_path):
    """From the second epoch on the order depends on the data seed and the epoch only, not on torch's global
    generator: a resumed run and every torchrun process draw the same order as the uninterrupted run."""
    from transformers import TrainingArguments
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in range(3, 40)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, seed=3, data_seed=3,
                             train_sampling_strategy="group_by_length", use_cpu=True, report_to=[])
    trainer = h.trainer_class()(model=torch.nn.Linear(1, 1), args=args, train_dataset=examples)
    sampler = trainer._get_train_sampler()
    orders = {}
    for epoch in (0, 1, 2.5):  # 2.5: a run resumed halfway through its third epoch
        trainer.state.epoch = epoch
        for state in (1, 2):
            torch.manual_seed(state)  # whatever the generator went through before the epoch
            orders[epoch, state] = list(sampler)
    assert orders[1, 1] == orders[1, 2] and orders[2.5, 1] == orders[2.5, 2] and orders[1, 1] != orders[2.5, 1]
    assert orders[0, 1] != orders[0, 2]  # the first epoch keeps the library's draw: one-epoch runs are as before
    assert sorted(orders[1, 1]) == list(range(len(examples)))


def test_one_process_trains_on_one_gpu(tmp_path, capsys):
    """A process that sees several GPUs (plain python on Kaggle's two T4s) trained DataParallel with the micro-batch
    multiplied by their number; several GPUs are torchrun's."""
    from transformers import TrainingArguments
    real = TrainingArguments.__init__

    def two_gpus(self, *args, **kwargs):
        real(self, *args, **kwargs)
        _ = self.device
        self._n_gpu = 2  # what transformers finds on a two-GPU machine without torchrun
    args = argparse.Namespace(micro_batch_size=3, grad_accum=1, lr=1e-3, lr_schedule="cosine", warmup_ratio=0.0,
                              weight_decay=0.0, max_grad_norm=1.0, epochs=1, max_steps=None, seed=0, report_to=[])
    try:
        TrainingArguments.__init__ = two_gpus
        arguments = h.training_arguments(args, str(tmp_path))
    finally:
        TrainingArguments.__init__ = real
    assert arguments.n_gpu == 1 and arguments.train_batch_size == 3
    assert "torchrun --nproc_per_node 2" in capsys.readouterr().err


def test_a_conversion_killed_mid_save_is_cleared_from_the_cache(tmp_path, monkeypatch):
    """A GGUF assembled or converted under a temporary name by a process that died (out of memory, a notebook
    stopped) left gigabytes in the cache that nothing removed; the next cache_lock removes them."""
    monkeypatch.setenv("SAFE_FT_CACHE", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    leftover = tmp_path / f".tmp-{dead}-{h._host_tag()}-model-abc"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"0" * 10)
    with h.cache_lock(str(tmp_path / "model")):
        assert not leftover.exists()
