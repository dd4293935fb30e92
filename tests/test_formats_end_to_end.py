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


def test_conversations_without_the_chat_template_are_found_before_the_weights(tiny_llama, tmp_path, capsys,
                                                                              no_weights):
    """Every script that reads a conversation file names its file and line when the template is not chat, and
    does so before the weights load (no_weights): on a 7B model that load is minutes lost."""
    import locate_layers
    import train_sv
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"tell me {w}"},
                                                               {"role": "assistant", "content": f"here is {w}"}]}
                                                 for w in "abcdef"])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"say {w}", "response": f"ok {w}"} for w in "abcdef"])
    alpaca = ["--model", tiny_llama, "--template", "alpaca"]
    runs = {
        "finetune": (finetune.main, ["--data", chat, "--out", str(tmp_path / "ft")]),
        "train_sv": (train_sv.main, ["--data", plain, "--check-data", chat, "--out", str(tmp_path / "sv")]),
        "evaluate": (evaluate.main, ["--harmful", plain, "--over-rejection", chat, "--skip-task",
                                     "--out", str(tmp_path / "e.json")]),
        "locate_layers": (locate_layers.main, ["--normal", plain, "--malicious", chat, "--skip-scaling",
                                               "--out", str(tmp_path / "layers.json")]),
    }
    for script, (main, argv) in runs.items():
        with pytest.raises(SystemExit) as exit_info:
            main(alpaca + argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2, script
        assert err.startswith(f"error: {chat}:1: conversation data (messages) needs --template chat"), (script, err)
        assert "alpaca" in err, (script, err)
    assert not any((tmp_path / name).exists() for name in ("ft", "sv", "e.json", "layers.json"))
