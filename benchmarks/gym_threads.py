"""Time 1000 Adam steps of a small MLP with N torch threads: python benchmarks/gym_threads.py 1 (then 2)."""
import sys
import time

import torch
from torch import nn

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
opt = torch.optim.Adam(net.parameters())
x = torch.randn(512, 8)


def adam_step() -> None:
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()


for _ in range(50):
    adam_step()
t = time.perf_counter()
for _ in range(1000):
    adam_step()
print(f"threads={sys.argv[1]}: {(time.perf_counter()-t):.2f} s per 1000 optimizer steps (mini-batch 512, 64-64 MLP)")
