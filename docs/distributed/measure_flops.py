"""The CPU measurements behind the GPU estimates of docs/DISTRIBUTED.md: one core's matmul
FLOP/s, and the time of one distillation step (student forward + backward, k = 1 targets) of
the SmolLM2-135M architecture at a small batch, set against the step's counted FLOPs.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python docs/distributed/measure_flops.py
"""

import json
import statistics
import time

import torch

from kforcing.core.config import ModelConfig
from kforcing.core.model import Transformer
from kforcing.students.pushforward import PushForward, StudentConfig

torch.manual_seed(0)
torch.set_num_threads(1)


def median_time(fn, repeats: int = 3) -> float:
    fn()                                   # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
matmul = 2 * 1024**3 / median_time(lambda: a @ b, 5)

arch = ModelConfig(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, dim=576,
                   intermediate_size=1536, max_seq_len=1024, rope_theta=100000.0)
teacher = Transformer(arch).requires_grad_(False)
student = PushForward(teacher, StudentConfig(max_k=4, layout="shared", head="argmax"))
P = sum(p.numel() for p in teacher.parameters())
B, N, M, k = 2, 64, 16, 1
x = torch.randint(0, arch.vocab_size, (B, N))
u = torch.rand(B, M, k, dtype=torch.float64)
tau = torch.ones(B, dtype=torch.float64)
anchors = torch.arange(0, N, N // M)


def step():
    with torch.no_grad():
        teacher(x)                          # targets of a k = 1 stage: one teacher pass
    out = student.staircase_forward(x, u, tau, anchors)
    out.logits.float().logsumexp(-1).mean().backward()


t_step = median_time(step)
flops = 6 * P * B * (N + M * k) + 2 * P * B * N
print(json.dumps({"params": P, "matmul_gflops_1core": round(matmul / 1e9, 1),
                  "step_s": round(t_step, 3), "step_flops": flops,
                  "achieved_gflops_1core": round(flops / t_step / 1e9, 1),
                  "fraction_of_matmul": round(flops / t_step / matmul, 3)}))
