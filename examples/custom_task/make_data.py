"""Write the data of a custom task: double every letter ("dbl abc=" -> "aabbcc").

    python examples/custom_task/make_data.py OUT_DIR [MIN-MAX]

writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl with columns `prompt` and `answer` (used by
the reward), and OUT_DIR/sft.jsonl with `prompt` and `completion` for the warm start. Words
have 2-4 letters unless MIN-MAX says otherwise (8-16: answers of 16-32 tokens, a long dense
reward, as in docs/lm.md "Choosing the KL").
"""

import json
import random
import sys
from pathlib import Path


def example(rng: random.Random, lengths: tuple[int, int]) -> dict:
    word = "".join(rng.choice("abcdef") for _ in range(rng.randint(*lengths)))
    return {"prompt": f"dbl {word}=", "answer": "".join(c + c for c in word)}


def main(out: Path, lengths: tuple[int, int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    train = [example(rng, lengths) for _ in range(2000)]
    evals = [example(rng, lengths) for _ in range(100)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    sft = [{"prompt": r["prompt"], "completion": r["answer"]} for r in train[:500]]
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    print(f"wrote {out}/train.jsonl, eval.jsonl, sft.jsonl")


if __name__ == "__main__":
    low, high = (int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "2-4").split("-"))
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "custom_task_data"), (low, high))
