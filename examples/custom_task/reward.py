"""The reward of the custom task, in the TRL convention: the dataset's `answer` column arrives
by name. 1.0 for the exact answer, partial credit for each correct character otherwise."""


def doubled_letters(prompts, completions, answer, **kwargs):
    rewards = []
    for completion, target in zip(completions, answer):
        completion = completion.strip()
        hits = sum(a == b for a, b in zip(completion, target))
        rewards.append(hits / max(len(completion), len(target), 1))
    return rewards
