"""Stand-in for "your model": save a small randomly initialised causal LM and its tokenizer to a
directory, which then loads with `from_pretrained` exactly like a downloaded checkpoint.

    python examples/custom_task/make_model.py OUT_DIR

(With internet access you would skip this and pass a hub name, e.g. model=Qwen/Qwen2.5-0.5B.)
"""

import sys

from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

out = sys.argv[1] if len(sys.argv) > 1 else "tiny-model"
tokenizer = build_char_tokenizer()
build_tiny_model(tokenizer, seed=0).save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"saved {out}")
