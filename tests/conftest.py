"""Shared fixtures: tiny randomly initialised Llama- and Qwen2-shaped models that build offline in seconds."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "the a an is are was of to and in on for with how do i you me my can what why when where who "
    "please write tell give make explain help show list describe step steps plan guide here sure "
    "sorry cannot can't won't will not no yes ok it this that there some any about from into by "
    "python process kill bomb weapon cake bread recipe story poem email letter code function "
    "bank account hack steal money drug virus malware computer network password friend family "
    "answer question number sum plus minus equals total apples has have buys gives more less "
    "tom ann bob sam eve # #### . , ? ! : ' \" - + = ( ) 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 "
    "17 18 19 20 hello hi thanks good bad best way safe harmful illegal dangerous"
).split()
# A system turn is plain text ("system: ...") so the vocabulary, and so every tiny model, stays as it was.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
    "{% elif m['role'] == 'system' %}system: {{ m['content'] }} <|end|> "
    "{% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE trained on WORDS: round-trips any text, and AutoTokenizer keeps it for every model type."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "</s>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(kind, path, num_layers=4, hidden=32, seed=0, head_scale=1.0):
    """head_scale > 1 makes a "learnable" model: with a random 0.02-std output layer the logits can move by
    less than one nat whatever an adapter on the blocks does, so no loss could fall far enough to test
    training; trained models (and a scaled head) can make confident predictions."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    tokenizer = make_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  tie_word_embeddings=False)
    config = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads per process crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tmp_path_factory):
    """A tiny model directory of each architecture in turn."""
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture
def no_weights(monkeypatch):
    """Bad input must be found before the weights load: loading them fails the test."""
    import safeft

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(safeft, "load_model", fail)


def copy_without_chat_template(model_dir, dest):
    """A copy of a tiny model whose tokenizer has no chat template (for --template chat errors)."""
    import shutil
    shutil.copytree(model_dir, dest)
    for name in os.listdir(dest):
        if "chat_template" in name:
            os.remove(os.path.join(dest, name))
    config_path = os.path.join(dest, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("chat_template", None)
    with open(config_path, "w") as f:
        json.dump(config, f)
    return str(dest)
