"""A reward in TRL's conversational signature: with chat prompts, each completion arrives as
``[{"role": "assistant", "content": text}]``; the dataset's ``answer`` column by name. 1.0 for
the exact answer, partial credit per correct character otherwise (as examples/custom_task)."""


def doubled_letters(completions, answer, **kwargs):
    rewards = []
    for completion, target in zip(completions, answer):
        text = completion[0]["content"].strip()
        hits = sum(a == b for a, b in zip(text, target))
        rewards.append(hits / max(len(text), len(target), 1))
    return rewards
