"""Executor overhead: autoplan's applied layout vs the same layout written by hand, and the cost model's
predicted step time vs the measured one.

    torchrun --standalone --nproc_per_node 4 benchmarks/executor_overhead.py \
        [--out benchmarks/results/executor_overhead.json] [--steps 10] [--blocks 3]

Layout: a small GPT on 4 gloo CPU ranks, planned with the mesh pinned to dp2 × tp2 and FSDP (the planner picks
microbatches and tensor-parallel styles on the "cpu" cluster preset). The hand-written version makes the same
torch.distributed calls directly, torchtitan style: ``init_device_mesh``, ``parallelize_module`` with the plan's
styles, the tied head re-tied, ``fully_shard`` per block then on the root, gradient accumulation over the plan's
microbatches, the global-batch loss all-reduced as ``train_step`` returns it. Both run the same steps (train step
+ AdamW step) in alternating blocks after a warm-up; the medians are compared. Goal: autoplan / by hand ≤ 1.05.

The measured step is also compared with the cost model's prediction, once with the "cpu" preset and once with this
job's figures from :func:`autoplan.calibrate.calibrate` (matmul FLOP/s, per-layer overhead, all-reduce bandwidth
and latency).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import parallelize_module

import autoplan
from autoplan.calibrate import calibrate
from autoplan.execute.batch import default_loss
from autoplan.execute.tensor_parallel import parallel_style
from autoplan.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=256, seq_len=64, hidden=128, layers=4, heads=4)
GLOBAL_BATCH = 16


def fresh_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def data(steps: int):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, CONFIG.vocab_size, (steps, GLOBAL_BATCH, CONFIG.seq_len + 1), generator=g)
    return [(x[:, :-1], x[:, 1:]) for x in t]


def by_hand(plan: autoplan.Plan):
    """The plan's layout with torch.distributed calls only; returns a step function."""
    model = fresh_model()
    mesh = init_device_mesh("cpu", (plan.mesh.dp, plan.mesh.tp), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {fqn: parallel_style(s) for fqn, s in plan.tensor_parallel.items()})
    model.head.weight = model.tok.weight  # re-tie: both shard dim 0
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dp_rank, dp, m = mesh["dp"].get_local_rank(), plan.mesh.dp, plan.microbatches

    def step(inputs, targets):
        per = GLOBAL_BATCH // dp
        x, y = inputs[dp_rank * per:(dp_rank + 1) * per], targets[dp_rank * per:(dp_rank + 1) * per]
        total = torch.zeros(())
        for i, (xm, ym) in enumerate(zip(x.chunk(m), y.chunk(m))):
            model.set_requires_gradient_sync(i == m - 1)
            loss = default_loss(model(xm), ym)
            (loss / m).backward()
            total += loss.detach()
        dist.all_reduce(total, group=mesh["dp"].get_group())  # the global-batch loss, as train_step returns
        float(total / (m * dp))
        opt.step()
        opt.zero_grad()

    return step


def with_autoplan(plan: autoplan.Plan):
    pm = autoplan.parallelize(fresh_model(), plan=plan)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)

    def step(inputs, targets):
        pm.train_step(inputs, targets)
        opt.step()
        opt.zero_grad()

    return step


def timed(step, batches) -> list[float]:
    times = []
    for inputs, targets in batches:
        dist.barrier()
        start = time.perf_counter()
        step(inputs, targets)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "executor_overhead.json"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks of each runner")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cluster = autoplan.Cluster.preset("cpu", devices_per_node=dist.get_world_size())
    batches = data(args.steps)
    calibrated = calibrate(size_bytes=4 * 2**20, matmul_n=512)  # this job's measured FLOP/s and links
    pins = dict(precision="fp32", mesh={"pp": 1, "dp": 2, "tp": 2}, data_parallel="fsdp", recompute="none")
    box = [None, None]
    if dist.get_rank() == 0:
        plan = autoplan.plan(fresh_model(), batches[0][0], cluster=cluster, **pins)
        # The same layout priced with the calibrated figures (microbatch size pinned to the preset plan's).
        recal = autoplan.plan(fresh_model(), batches[0][0], cluster=calibrated, microbatch_size=plan.microbatch_size,
                              **pins)
        box = [plan.to_dict(), recal.to_dict()]
    dist.broadcast_object_list(box, src=0)
    plan, recal = (autoplan.Plan.from_dict(d) for d in box)
    runners = {"autoplan": with_autoplan(plan), "by hand": by_hand(plan)}
    for step in runners.values():  # warm-up: first-step allocations, DTensor dispatch caches
        timed(step, batches[:2])
    times = {name: [] for name in runners}
    for _ in range(args.blocks):
        for name, step in runners.items():
            times[name] += timed(step, batches)
    median = {name: statistics.median(t) for name, t in times.items()}
    predicted = plan.predicted.step_time_s if plan.predicted else float("nan")
    predicted_cal = recal.predicted.step_time_s if recal.predicted else float("nan")
    same_layout = recal.tensor_parallel == plan.tensor_parallel and recal.microbatches == plan.microbatches
    result = {
        "layout": str(plan.mesh), "data_parallel": plan.data_parallel, "microbatches": plan.microbatches,
        "tensor_parallel_modules": len(plan.tensor_parallel), "model_params": plan.model.num_params,
        "global_batch": GLOBAL_BATCH, "steps_timed": len(times["autoplan"]),
        "step_s_autoplan": median["autoplan"], "step_s_by_hand": median["by hand"],
        "overhead_ratio": median["autoplan"] / median["by hand"],
        "predicted_step_s": predicted, "prediction_error": (predicted - median["autoplan"]) / median["autoplan"],
        "predicted_step_s_calibrated": predicted_cal,
        "prediction_error_calibrated": (predicted_cal - median["autoplan"]) / median["autoplan"],
        "calibrated_plan_same_layout": same_layout,
        "calibrated_fp32_flops": calibrated.device.peak_flops["fp32"],
        "calibrated_intra_node_bandwidth_Bps": calibrated.intra_node_bandwidth_Bps,
        "calibrated_layer_overhead_s": calibrated.device.layer_overhead_s,
        "device": "4 gloo ranks on this machine's CPU", "torch": torch.__version__,
    }
    if dist.get_rank() == 0:
        print(f"layout {result['layout']} {plan.data_parallel}, {plan.microbatches} microbatches, "
              f"{len(plan.tensor_parallel)} TP modules, {plan.model.num_params:,} params")
        print(f"{'runner':<12}{'median step':>14}")
        for name in runners:
            print(f"{name:<12}{median[name] * 1e3:>11.1f} ms")
        print(f"{'predicted':<12}{predicted * 1e3:>11.1f} ms   (\"cpu\" preset)")
        print(f"{'predicted':<12}{predicted_cal * 1e3:>11.1f} ms   (calibrated: fp32 "
              f"{calibrated.device.peak_flops['fp32'] / 1e9:.1f} GFLOP/s per rank, all-reduce "
              f"{calibrated.intra_node_bandwidth_Bps / 1e9:.2f} GB/s, layer overhead "
              f"{calibrated.device.layer_overhead_s * 1e6:.0f} µs{'' if same_layout else '; layout differs'})")
        print(f"overhead ratio autoplan / by hand: {result['overhead_ratio']:.3f} (goal ≤ 1.05)")
        print(f"cost model error (predicted − measured) / measured: {result['prediction_error']:+.1%} with the "
              f"preset, {result['prediction_error_calibrated']:+.1%} calibrated")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
