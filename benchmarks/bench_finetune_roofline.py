"""How much faster batched test-time fine-tuning could be on this CPU at all: the arithmetic of one fine-tuning
step of the embedded model (floating-point operations counted by `torch.utils.flop_counter`) against

* the rate one episode's step reaches on its own (a plain forward + backward of the backbone on the 10 images of
  a 5-way 1-shot step, the clean and the augmented support, 32 px, the committed tiny ViT's shape, and an
  AdamW-like update of every weight),
* the rate 16 episodes' steps reach together (`torch.func.vmap` over 16 weight copies, as
  `smat.evaluation.finetune` runs them),
* the rate of one large fp32 matrix product (1024 x 1024 x 1024), the practical peak of a core.

The ceiling of any batching is peak / single: a step that already runs at a third of the peak cannot become
5 times faster by batching episodes. Writes benchmarks/results/finetune_roofline.json.

    python benchmarks/bench_finetune_roofline.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap
from torch.utils.flop_counter import FlopCounterMode

from smat.io import provenance, write_json
from smat.models.backbones import create_backbone

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "finetune_roofline.json"
SUPPORT, BATCH, REPEATS = 10, 16, 20


def seconds(fn, repeats: int = REPEATS) -> float:
    fn()                                                    # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch4_32", 32)
    for module in backbone.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False                       # as the batched fine-tuning runs it
    params = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    x = torch.randn(SUPPORT, 3, 32, 32)

    def loss(weights, images):
        return functional_call(backbone, weights, (images,)).square().mean()

    step_grad = grad(loss)

    def adamw(weights, grads, lr=1e-4):
        return {n: w - lr * g / (g.abs() + 1e-8) - lr * 0.01 * w for (n, w), g in zip(weights.items(), grads.values())}

    def single():
        adamw(params, step_grad(params, x))

    with FlopCounterMode(display=False) as counter:
        single()
    flops = counter.get_total_flops()

    stacked = {n: p.unsqueeze(0).expand(BATCH, *p.shape).clone() for n, p in params.items()}
    xs = x.unsqueeze(0).expand(BATCH, *x.shape).clone()
    batched_grad = vmap(step_grad)

    def batched():
        adamw(stacked, batched_grad(stacked, xs))

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t_single, t_batched = seconds(single), seconds(batched, REPEATS // 4)
    t_matmul = seconds(lambda: a @ b)
    rates = {"single_episode": flops / t_single / 1e9, "batched_per_episode": BATCH * flops / t_batched / 1e9,
             "matmul_1024": 2 * 1024 ** 3 / t_matmul / 1e9}
    record = {"what": __doc__.split("\n\n")[0], "threads": args.threads, "support_images": SUPPORT, "batch": BATCH,
              "gflop_per_step": flops / 1e9, "gflop_per_s": rates,
              "batched_speedup": rates["batched_per_episode"] / rates["single_episode"],
              "ceiling_speedup_peak_over_single": rates["matmul_1024"] / rates["single_episode"],
              "provenance": provenance(command="benchmarks/bench_finetune_roofline.py", argv=vars(args))}
    write_json(OUT, record)
    print(f"one step: {flops / 1e9:.3f} GFLOP; GFLOP/s: single episode {rates['single_episode']:.1f}, batched "
          f"{rates['batched_per_episode']:.1f} per episode, 1024^3 matmul {rates['matmul_1024']:.1f}; "
          f"ceiling of batching {record['ceiling_speedup_peak_over_single']:.2f}x (measured "
          f"{record['batched_speedup']:.2f}x)")


if __name__ == "__main__":
    main()
