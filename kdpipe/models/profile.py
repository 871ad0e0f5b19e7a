"""What a network costs to serve: parameters, multiply-accumulates per image (torch's `FlopCounterMode`), and
measured CPU latency at batch 1 and throughput at batch 64, the figures a deployment decision weighs against
accuracy."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

LATENCY_RUNS, THROUGHPUT_RUNS, THROUGHPUT_BATCH = 7, 3, 64


@dataclass(frozen=True)
class Profile:
    params: int
    macs: int  # per image, at the profiled image size
    latency_ms: float  # median over runs, batch 1
    images_per_second: float  # median over runs, batch 64
    threads: int  # CPU threads the timings ran on

    def metrics(self) -> dict[str, float]:
        return {f"model/{key}": float(value) for key, value in asdict(self).items()}


def count_macs(network: nn.Module, image_size: int) -> int:
    """Multiply-accumulates for one image: torch counts 2 FLOPs per multiply-accumulate of a convolution or a
    matrix product."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() // 2


def median_seconds(network: nn.Module, batch: torch.Tensor, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        network(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def profile(network: nn.Module, image_size: int, threads: int) -> Profile:
    """`network` in eval mode on the CPU with `threads` threads (restored after): one warm-up pass, then the median
    of several timed ones."""
    network = network.eval().cpu()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        single = torch.randn(1, 3, image_size, image_size)
        batch = torch.randn(THROUGHPUT_BATCH, 3, image_size, image_size)
        network(single)  # warm-up: first-call allocations and kernel choices (the batch median absorbs its own)
        latency = median_seconds(network, single, LATENCY_RUNS)
        throughput = THROUGHPUT_BATCH / median_seconds(network, batch, THROUGHPUT_RUNS)
    finally:
        torch.set_num_threads(before)
    params = sum(p.numel() for p in network.parameters())
    return Profile(params, count_macs(network, image_size), latency * 1000, throughput, threads)
