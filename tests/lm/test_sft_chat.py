"""`reinforcepp sft` on TRL's chat data (issue 25): a `messages` column of whole conversations,
prompt/completion columns holding messages; the assistant turns learned, nothing else; bad rows
named; the output folder guarded. Then RL on conversational prompts with a TRL reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reinforcepp.cli import main
from reinforcepp.lm.data import render_prompt
from reinforcepp.lm.sft import SFTConfig, encode_chat, encode_examples, sft_on_ids, sft_train
from reinforcepp.lm.tasks import build_chat_tokenizer, build_tiny_qwen2
from reinforcepp.run import read_metrics
from tests.lm.helpers import tiny_policy

CONVERSATION = [
    {"role": "system", "content": "double"},
    {"role": "user", "content": "ab"},
    {"role": "assistant", "content": "aabb"},
    {"role": "user", "content": "c"},
    {"role": "assistant", "content": "cc"},
]

TRL_REWARD = '''
def doubled(completions, answer, **kwargs):
    """TRL's conversational signature: each completion is [{"role": "assistant", "content": ...}]."""
    return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]
'''


def pieces(tok, ids, mask):
    return [(tok.decode([t]), m) for t, m in zip(ids, mask)]


def test_a_conversation_learns_its_assistant_turns_through_the_end_of_turn_token():
    tok = build_chat_tokenizer()
    prompt, response, mask = encode_chat(tok, CONVERSATION)
    # the prompt is the conversation up to the first answer, rendered as RL renders a prompt
    assert prompt == tok(render_prompt(tok, CONVERSATION[:2]), add_special_tokens=False)["input_ids"]
    assert tok.decode(prompt) == ("<|im_start|>system\ndouble<|im_end|>\n<|im_start|>user\nab<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    context = "\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    expected = ([("a", 1), ("a", 1), ("b", 1), ("b", 1), ("<|im_end|>", 1)] + [(x, 0) for x in tok.tokenize(context)]
                + [("c", 1), ("c", 1), ("<|im_end|>", 1)])  # the template's last "\n" is dropped: nothing learned there
    assert pieces(tok, response, mask) == expected
    # prompt/completion: only the completion's assistant turns; the first answer is context
    prompt2, response2, mask2 = encode_chat(tok, CONVERSATION, learn_from=3)
    assert tok.decode(prompt2) == tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert pieces(tok, response2, mask2) == [("c", 1), ("c", 1), ("<|im_end|>", 1)]


def test_templates_without_an_eos_turn_end_get_eos_on_the_last_turn_and_rewriting_templates_are_refused():
    tok = build_chat_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    _, response, mask = encode_chat(tok, CONVERSATION[1:3])
    assert pieces(tok, response, mask) == [("a", 1), ("a", 1), ("b", 1), ("b", 1), ("\n", 1), ("<|im_end|>", 1)]
    # drops old answers
    tok.chat_template = ("{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ValueError, match="does not render this conversation turn by turn"):
        encode_chat(tok, CONVERSATION)
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_chat(build_chat_tokenizer(), CONVERSATION[:2])


def test_string_pairs_train_exactly_as_before(tmp_path):
    rows = [{"prompt": f"rev {w}=", "completion": w[::-1]} for w in ("abc", "bcd", "cdef", "ab")]
    tok, _ = tiny_policy()
    cfg = SFTConfig.from_dict({"model": "m", "data": "d", "output_dir": str(tmp_path)})
    p, r, m = encode_examples(tok, rows, "pairs", cfg)
    losses = []
    for run in range(2):
        _, model = tiny_policy()
        if run == 0:
            losses.append(sft_train(model, tok, [x["prompt"] for x in rows], [x["completion"] for x in rows],
                                    steps=5, batch_size=2, lr=1e-2))
        else:
            losses.append(sft_on_ids(model, tok.pad_token_id, p, r, response_masks=m, steps=5, batch_size=2, lr=1e-2))
    assert losses[0] == losses[1]


@pytest.fixture(scope="module")
def chat_user(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = build_chat_tokenizer()
    build_tiny_qwen2(tok, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    words = ["ab", "bca", "cab", "abc", "ba", "ca", "bb", "ac"]
    convo = [[{"role": "user", "content": f"dbl {w}"}, {"role": "assistant", "content": "".join(c + c for c in w)}]
             for w in words]
    (root / "messages.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in convo))
    (root / "pc.jsonl").write_text("".join(json.dumps({"prompt": m[:1], "completion": m[1:]}) + "\n" for m in convo))
    (root / "pc_string_prompt.jsonl").write_text("".join(json.dumps({"prompt": m[0]["content"], "completion": m[1:]})
                                                         + "\n" for m in convo))
    (root / "rl.jsonl").write_text("".join(json.dumps({"prompt": m[:1], "answer": m[1]["content"]}) + "\n"
                                           for m in convo))
    (root / "reward.py").write_text(TRL_REWARD)
    return root


@pytest.mark.parametrize("data", ["messages.jsonl", "pc.jsonl", "pc_string_prompt.jsonl"])
def test_sft_takes_trl_chat_formats_and_learns(chat_user, tmp_path, capsys, data):
    out = tmp_path / "sft"
    assert main(["sft", f"model={chat_user / 'model'}", f"data={chat_user / data}", f"output_dir={out}", "steps=40",
                 "batch_size=8", "lr=5e-3", "torch_threads=1"]) == 0
    captured = capsys.readouterr()
    first, last = (float(x) for x in captured.out.split("loss ")[1].split(" (")[0].split(" -> "))
    assert last < 0.6 * first
    assert ("conversations (assistant turns learned)" in captured.err) == (data == "messages.jsonl")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_sft_names_the_bad_row_and_the_missing_columns(chat_user, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "dbl a"}, {"role": "assistant", "content": "aa"}]},
            {"messages": [{"role": "user", "content": "dbl b"}]},
            {"messages": "dbl c"}]
    common = [f"model={chat_user / 'model'}", "steps=1", "batch_size=1", "torch_threads=1"]
    for bad, said in ((rows[:2], "row 1: column 'messages' has no assistant turn to learn"),
                      ([rows[0], rows[0], rows[2]],
                       "row 2: column 'messages' is a str ('dbl c'), not a non-empty list of chat messages"),
                      ([{"text": "x"}],
                       "has neither 'prompt' and 'completion' columns nor a 'messages' column of conversations "
                       "(columns: text)"),
                      ([{"prompt": "x", "answer": "y"}],
                       "has a 'prompt' column but no 'completion' column (columns: prompt, answer)"),
                      ([rows[0]], "set messages_column=messages instead of prompt_column")):
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in bad))
        extra = ["prompt_column=messages"] if "messages_column=" in said else []
        assert main(["sft", *common, f"data={path}", f"output_dir={tmp_path / 'o'}", *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and said in err.strip().splitlines()[-1], err
    # chat messages with a tokenizer that has no chat template: the row and the reason
    tok, model = tiny_policy()
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    assert main(["sft", f"model={tmp_path / 'plain'}", f"data={chat_user / 'messages.jsonl'}",
                 f"output_dir={tmp_path / 'o'}", "steps=1"]) == 2
    assert ("row 0: column 'messages' holds chat messages, which need the tokenizer's chat template"
            in capsys.readouterr().err)


def test_sft_refuses_a_used_output_dir_and_its_own_model_unless_overwrite(chat_user, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(chat_user / "model", model)
    original = (model / "model.safetensors").read_bytes()
    common = [f"data={chat_user / 'messages.jsonl'}", "steps=2", "batch_size=2", "torch_threads=1"]
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert main(["sft", f"model={model}", f"output_dir={used}", *common]) == 2
    assert f"output_dir={used} already holds files" in capsys.readouterr().err and (used / "notes.txt").exists()
    assert main(["sft", f"model={model}", f"output_dir={model}", *common]) == 2
    assert f"output_dir={model} is the model being fine-tuned: saving there would replace it" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == original
    assert main(["sft", f"model={model}", f"output_dir={model}", *common, "--overwrite"]) == 0
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("model.old-")]
    assert f"moved the old {model} aside to {aside}" in capsys.readouterr().err
    assert (aside / "model.safetensors").read_bytes() == original  # loaded from there, kept
    assert (model / "model.safetensors").read_bytes() != original  # the fine-tuned model


def test_rl_on_conversational_prompts_with_a_trl_reward_after_chat_sft(chat_user, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert main(["sft", f"model={chat_user / 'model'}", f"data={chat_user / 'messages.jsonl'}", f"output_dir={sft}",
                 "steps=40", "batch_size=8", "torch_threads=1"]) == 0
    run = tmp_path / "run"
    assert main(["train", f"model={sft}", f"train_data={chat_user / 'rl.jsonl'}", f"eval_data={chat_user / 'rl.jsonl'}",
                 f"reward_funcs={chat_user / 'reward.py'}:doubled", "estimator=grpo", "prompts_per_step=4",
                 "samples_per_prompt=4", "micro_batch_size=16", "max_new_tokens=8", "total_steps=2", "eval_every=2",
                 "eval_samples=2", "lr=1e-3", "torch_threads=1", "progress=false", "tensorboard=false",
                 f"output_dir={run}"]) == 0
    rows = read_metrics(run)
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2 and all("reward/doubled" in r for r in train)
    # responses end at <|im_end|>, the chat model's EOS: none was cut at max_new_tokens after the warm start
    assert train[0]["response/truncated_frac"] < 1.0
    assert torch.isfinite(torch.tensor([r["reward/mean"] for r in train])).all()
    assert "held-out reward (greedy)" in capsys.readouterr().out
    assert Path(run / "reference.json").exists()


def test_a_messages_row_and_its_prompt_completion_split_encode_the_same():
    tok = build_chat_tokenizer()
    cfg = SFTConfig.from_dict({"model": "m", "data": "d", "output_dir": "o"})
    convo = CONVERSATION[1:3]
    assert (encode_examples(tok, [{"messages": convo}], "conversations", cfg)
            == encode_examples(tok, [{"prompt": convo[:1], "completion": convo[1:]}], "pairs", cfg)
            == encode_examples(tok, [{"prompt": "ab", "completion": convo[1:]}], "pairs", cfg))


def test_rl_data_with_a_messages_column_is_pointed_at_it():
    import datasets

    from reinforcepp.lm.data import check_prompt_column

    rows = datasets.Dataset.from_list([{"messages": CONVERSATION[1:2], "answer": "aabb"}])
    with pytest.raises(ValueError, match=r"column 'messages' holds chat messages: set prompt_column='messages' "
                                         r"if they end before the answer \(whole conversations with the answer "
                                         r"are warm-start data"):
        check_prompt_column(rows, "prompt")
