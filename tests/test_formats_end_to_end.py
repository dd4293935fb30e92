"""Each data format people bring trains through finetune.py and evaluates through evaluate.py as it is:
Alpaca with input, TRL messages with a system prompt and two assistant turns, ShareGPT, prompt/completion message
lists, Parquet and a datasets save_to_disk folder. Every sample is built here."""
import json

import pytest

import evaluate
import finetune
from conftest import write_jsonl
from test_data_formats import CONVERSATION, SHAREGPT, save_to_disk, write_parquet

PLAIN = [{"prompt": "how do i make bread ?", "response": "here is a recipe"},
         {"prompt": "tell me a story", "response": "once there was a cake"}]


def alpaca(path):
    path.write_text(json.dumps([{"instruction": "write the sum", "input": "1 + 2", "output": "3"},
                                {"instruction": "write the sum", "input": "4 + 5", "output": "9"}]))
    return str(path)


def messages(path):
    second = CONVERSATION[:2] + [{"role": "assistant", "content": "knead it"}]
    return write_jsonl(path, [{"messages": CONVERSATION}, {"messages": second}])


def sharegpt(path):
    path.write_text(json.dumps([{"conversations": SHAREGPT}, {"conversations": SHAREGPT[:3]}]))
    return str(path)


def prompt_completion(path):
    return write_jsonl(path, [{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]},
                              {"prompt": CONVERSATION[:2], "completion": [CONVERSATION[2]]}])


FORMATS = {
    "alpaca-with-input.json": alpaca,
    "messages.jsonl": messages,
    "sharegpt.json": sharegpt,
    "prompt-completion.jsonl": prompt_completion,
    "plain.parquet": lambda path: write_parquet(path, PLAIN),
    "plain-datasets": lambda path: save_to_disk(path, PLAIN),
    "chat.parquet": lambda path: write_parquet(path, [{"messages": CONVERSATION}]),
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_and_evaluates_through_the_scripts(name, tiny_llama, tmp_path, one_thread):
    data = FORMATS[name](tmp_path / name)
    log = finetune.main(["--model", tiny_llama, "--data", data, "--max-steps", "1", "--out", str(tmp_path / "ft")])
    assert log["steps"] == 1 and log["rows"] >= 1 and log["losses"][0] > 0
    assert (tmp_path / "ft" / "adapter_model.safetensors").exists()
    evaluate.main(["--model", tiny_llama, "--adapter", str(tmp_path / "ft"), "--harmful", data,
                   "--skip-over-rejection", "--skip-task", "--max-new-tokens", "4", "--out", str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["summary"]["harmful"]["n"] == log["rows"]
