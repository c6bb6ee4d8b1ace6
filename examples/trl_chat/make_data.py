"""TRL-style chat data for the double-every-letter task ("dbl abc" -> "aabbcc").

    python examples/trl_chat/make_data.py OUT_DIR

writes OUT_DIR/sft.jsonl, TRL's conversational format: a ``messages`` column of whole
conversations (system, user, assistant), and OUT_DIR/train.jsonl, eval.jsonl for RL: a
``prompt`` column of chat messages (the conversation up to the answer) and an ``answer`` column
for the reward, TRL's conversational prompt format.
"""

import json
import random
import sys
from pathlib import Path

SYSTEM = {"role": "system", "content": "Double every letter."}


def example(rng: random.Random) -> tuple[list[dict], str]:
    word = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 4)))
    return [SYSTEM, {"role": "user", "content": f"dbl {word}"}], "".join(c + c for c in word)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = [example(rng) for _ in range(2600)]
    sft = [{"messages": prompt + [{"role": "assistant", "content": answer}]} for prompt, answer in rows[:500]]
    train = [{"prompt": prompt, "answer": answer} for prompt, answer in rows[500:2500]]
    evals = [{"prompt": prompt, "answer": answer} for prompt, answer in rows[2500:]]
    for name, data in (("sft", sft), ("train", train), ("eval", evals)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {out}/sft.jsonl (messages), train.jsonl, eval.jsonl (prompt as chat messages, answer)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "trl_chat_data"))
