"""A user-defined tool (docs/agents.md, "Worked example"): a per-row key-value table that the
model cannot know and must look up with ``<tool>get KEY</tool>``.

    reinforcepp train model=Qwen/Qwen2.5-0.5B-Instruct train_data=examples/tool_env/kv.jsonl \
        environment=examples/tool_env/kv_env.py:make_env max_turns=3 max_new_tokens=64 \
        samples_per_prompt=8 estimator=reinforce_pp_baseline
"""

import json

from reinforcepp.agents import TagToolParser, ToolEnv


class KVEnv(ToolEnv):
    def __init__(self):
        super().__init__({"get": self.get}, parser=TagToolParser(), timeout=2.0,
                         reward_fn=lambda row, answer: float(answer.strip() == row["answer"]))

    def get(self, key: str) -> str:
        table = json.loads(self.row["table"])  # self.row: the episode's dataset row
        return table[key]  # a KeyError goes back to the model as an error


def make_env():
    return KVEnv()
