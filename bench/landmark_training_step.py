"""Seconds per training step of the landmark detector, fp32 vs bf16 autocast + channels-last.

    python bench/landmark_training_step.py [--size 256] [--batch 16] [--steps 3]

Runs forward + backward + AdamW step on random input (the time does not depend on the pixel
values) for each mode in the same run, and prints the ratio. bf16 pays off on CPUs with
native bf16 (AMX, AVX512-BF16; see screener.pipeline.estimate.cpu_has_fast_bf16).
"""

from __future__ import annotations

import argparse
import time

import torch

from screener.pipeline.landmarks import LandmarkNet
from screener.pipeline.estimate import cpu_has_fast_bf16


def step_seconds(amp: bool, size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    net = LandmarkNet(width=96)
    if amp:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters())
    x = torch.randn(batch, 1, size, size)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        out.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    fp32 = step_seconds(False, a.size, a.batch, a.steps)
    bf16 = step_seconds(True, a.size, a.batch, a.steps)
    print(f"native bf16 on this CPU: {cpu_has_fast_bf16()}; threads: {torch.get_num_threads()}")
    print(f"fp32: {fp32:.2f} s/step   bf16 + channels-last: {bf16:.2f} s/step   ratio {fp32 / bf16:.2f}x "
          f"(batch {a.batch}, {a.size} px)")


if __name__ == "__main__":
    main()
