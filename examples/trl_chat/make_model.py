"""Stand-in for a chat model such as Qwen/Qwen2.5-0.5B-Instruct, with no download: a small
randomly initialised Qwen2 and a character-level tokenizer with Qwen2's chat format (ChatML:
``<|im_start|>user\\n...<|im_end|>``, ``<|im_end|>`` as EOS, the chat template saved with it).

    python examples/trl_chat/make_model.py OUT_DIR

It loads with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(OUT_DIR)`` like the real one.
"""

import sys

from reinforcepp.lm.tasks import build_chat_tokenizer, build_tiny_qwen2

out = sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen2-chat"
tokenizer = build_chat_tokenizer()
model = build_tiny_qwen2(tokenizer, seed=0)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"saved {out}: Qwen2, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
      f"chat template {tokenizer.chat_template[:40]!r}...")
