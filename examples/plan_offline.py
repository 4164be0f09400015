"""Plan GPT-3 175B for 1,024 A100-80GB GPUs (128 nodes × 8) on a laptop: no GPU, no weights in memory.

    python examples/plan_offline.py [--out gpt3_175b_plan.json]

The model is built on the meta device (``autoplan.models.gpt3_175b``), traced on fake tensors, and the planner
searches pipeline × data × tensor layouts, microbatches, schedule, recompute and DDP vs FSDP for a 1,536-sequence
global batch (the GPT-3 paper's 3.2M tokens). The plan is printed, explained and saved as JSON; apply it on the real
cluster with ``autoplan.parallelize(model, plan="gpt3_175b_plan.json")`` under torchrun.
"""

import argparse
import time

import autoplan
from autoplan.models import gpt3_175b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpt3_175b_plan.json")
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=1536)
    args = parser.parse_args()

    model, example = gpt3_175b()
    cluster = autoplan.Cluster.preset("a100-80gb", nodes=args.nodes)
    start = time.perf_counter()
    plan = autoplan.plan(model, example, cluster=cluster, global_batch_size=args.global_batch, precision="bf16")
    print(f"planned in {time.perf_counter() - start:.1f} s\n")
    print(plan)
    print()
    print(plan.explain())
    plan.save(args.out)
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
