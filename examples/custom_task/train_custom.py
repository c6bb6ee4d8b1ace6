"""The custom task through the Python API (run make_data.py, make_model.py and the sft command
of README.md first):

    python examples/custom_task/train_custom.py /tmp/dbl
"""

import sys
from pathlib import Path

from reinforcepp.lm import LMConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from reward import doubled_letters  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dbl")
config = LMConfig(
    model=str(root / "sft"), train_data=str(root / "train.jsonl"), eval_data=str(root / "eval.jsonl"),
    max_new_tokens=10, lr=3e-4, prompts_per_step=16, samples_per_prompt=8, micro_batch_size=64,
    total_steps=60, eval_every=10, torch_threads=1, output_dir=str(root / "run_api"),
)
final = Trainer(config, reward_funcs=[doubled_letters]).train()
print(final)
