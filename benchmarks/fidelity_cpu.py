"""Predicted against measured step time on this machine, after calibration, over pinned layouts of a GPT.

    torchrun --standalone --nproc_per_node 4 benchmarks/fidelity_cpu.py [--steps 4] [--rounds 2] [--out f.json]

Every rank first runs :func:`autoplan.calibrate.calibrate` (compute concurrency, matmul efficiency per size,
memory bandwidth, per-layer overheads of eager, DTensor and FSDP layers, collective times per kind, group size
and message size, all-reduce/compute overlap). Rank 0 then plans a small GPT on the calibrated cluster once per
layout, pinning the mesh, the data-parallel kind, the schedule and recompute (the planner still picks the
microbatches, stage cuts and tensor-parallel styles), and once with nothing pinned (the automatic plan), all on the figure-by-figure median of as many calibrations
as rounds taken back to back (:func:`median_figures`; the first is round 0's). Every
plan is applied once (all stay built) and warmed up by one step; then each of ``--rounds`` rounds takes
``--steps`` timed steps (train step + AdamW step) of every layout, one step of each in turn, so that a burst of
load from other jobs slows a step of every layout rather than all steps of one. The machine's load drifts, so
every round after the first calibrates again and re-prices the same plans on its own figures
(:func:`autoplan.cost.plan_cost.estimate`): each round's prediction is paired with the steps measured right
after its calibration. Per layout, the median of the rounds' predictions (one calibration caught by a burst of
load is outvoted) is compared with the median of all the rounds' steps (pooled over layouts whose plans are
identical: the automatic plan is often one of the pinned ones). Printed: predicted vs measured per
layout, the Spearman rank correlation over the pinned layouts, the median relative error, and the automatic
plan's measured time against the fastest pinned layout's; then the same figures of each round on its own (its
calibration against its own steps: how much a single calibration can be trusted), the machine's load average
around each round and the calibration's spreads. Goals: Spearman ≥ 0.9, median error ≤ 15%, automatic within
5% of the fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoplan  # noqa: E402
from autoplan.calibrate import calibrate  # noqa: E402
from autoplan.cost.plan_cost import estimate  # noqa: E402
from autoplan.models import GPT, GPTConfig  # noqa: E402

CONFIG = GPTConfig(vocab_size=256, seq_len=64, hidden=128, layers=4, heads=4)
GLOBAL_BATCH = 16
LAYOUTS = {
    "dp4 ddp": dict(mesh={"pp": 1, "dp": 4, "tp": 1}, data_parallel="ddp"),
    "dp4 fsdp": dict(mesh={"pp": 1, "dp": 4, "tp": 1}, data_parallel="fsdp"),
    "dp4 ddp recompute": dict(mesh={"pp": 1, "dp": 4, "tp": 1}, data_parallel="ddp", recompute="full"),
    "tp4": dict(mesh={"pp": 1, "dp": 1, "tp": 4}),
    "dp2×tp2 ddp": dict(mesh={"pp": 1, "dp": 2, "tp": 2}, data_parallel="ddp"),
    "dp2×tp2 fsdp": dict(mesh={"pp": 1, "dp": 2, "tp": 2}, data_parallel="fsdp"),
    "pp2×dp2 1f1b": dict(mesh={"pp": 2, "dp": 2, "tp": 1}, data_parallel="ddp", schedule="1f1b"),
    "pp4 1f1b": dict(mesh={"pp": 4, "dp": 1, "tp": 1}, schedule="1f1b"),
    "pp2×tp2 gpipe": dict(mesh={"pp": 2, "dp": 1, "tp": 2}, schedule="gpipe"),
}


def fresh_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, CONFIG.vocab_size, (steps, GLOBAL_BATCH, CONFIG.seq_len + 1), generator=g)
    return [(x[:, :-1], x[:, 1:]) for x in t]


class Trainer:
    """One layout applied once, stepped on demand: every layout stays built, so that the benchmark can take its
    steps in turn with every other layout's and all of them meet the same load from other jobs."""

    def __init__(self, plan: autoplan.Plan, batches) -> None:
        self.pm = autoplan.parallelize(fresh_model(), plan=plan)
        self.opt = torch.optim.AdamW(self.pm.parameters(), lr=1e-3)
        self.batches, self.calls = batches, 0
        self.step()  # the first step warms up allocations and dispatch caches

    def step(self) -> float:
        """Seconds of one train step + optimizer step (the slowest rank's, via barriers)."""
        inputs, targets = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        dist.barrier()
        start = time.perf_counter()
        self.pm.train_step(inputs, targets)
        self.opt.step()
        self.opt.zero_grad()
        dist.barrier()
        return time.perf_counter() - start


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among timings)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r
    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def median_figures(calibrations: list):
    """The figure-by-figure median of calibrations of one machine (cluster dicts of the same shape: every number
    is the median of the numbers at its place; names and structure are the first's). A figure one calibration
    leaves out is 0 there (``Cluster.to_dict`` writes no zero overheads).

    Example:
        >>> median_figures([{"a": 1.0, "t": [[1, 2.0]]}, {"a": 3.0, "t": [[1, 9.0]]}, {"t": [[1, 4.0]]}])
        {'a': 1.0, 't': [[1, 4.0]]}
    """
    first = calibrations[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for c in calibrations for k in c))
        return {k: median_figures([c.get(k, 0.0) for c in calibrations]) for k in keys}
    if isinstance(first, list):
        return [median_figures([c[i] for c in calibrations]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(calibrations)
    return first


def round_figures(rows: list[dict], measured: dict[str, float], k: int) -> dict:
    """Spearman and median |error| of round ``k``'s predictions against that round's own measured medians."""
    pinned = [r for r in rows if r["layout"] != "automatic"]
    pred = [r["round_predicted_s"][k] for r in pinned]
    meas = [measured[r["layout"]] for r in pinned]
    return {"spearman": spearman(pred, meas),
            "median_abs_error": statistics.median(abs(p - m) / m for p, m in zip(pred, meas))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout and round (one more warms up)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the layouts")
    parser.add_argument("--out", help="write the figures as JSON here (rank 0)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cluster = calibrate(size_bytes=2**22, matmul_n=512)
    overlap = calibrate.last_overlap
    # The layouts are planned (microbatches, cuts, the automatic plan) on the figure-by-figure median of as many
    # calibrations as rounds, taken back to back: one calibration under a burst of load once read a 4.7 ms layer
    # overhead where the next two read 1.7 and 0.6 ms, and a plan chosen on it is chosen for that burst. The
    # predictions are medians of as many calibrations (below), so the plans are chosen on the same footing.
    planning = [cluster.to_dict()] + [calibrate(size_bytes=2**22, matmul_n=512).to_dict()
                                      for _ in range(args.rounds - 1)]
    planning_cluster = autoplan.Cluster.from_dict(median_figures(planning))
    batches = data(args.steps + 1)
    cases = {**LAYOUTS, "automatic": {}}
    box = [None]
    if dist.get_rank() == 0:
        box = [{name: autoplan.plan(fresh_model(), batches[0][0], cluster=planning_cluster, precision="fp32",
                                    **pins).to_dict() for name, pins in cases.items()}]
    dist.broadcast_object_list(box, src=0)
    plans = {name: autoplan.Plan.from_dict(d) for name, d in box[0].items()}
    graph = autoplan.trace(fresh_model(), batches[0][0])
    steps: dict[str, list[float]] = {name: [] for name in plans}
    round_steps: list[dict[str, float]] = []
    predictions: dict[str, list] = {name: [] for name in plans}
    calibrations = [cluster.to_dict()]
    spreads = [dict(calibrate.last_spread)]
    load = [os.getloadavg()[0]]
    trainers = {name: Trainer(plan, batches) for name, plan in plans.items()}
    for round_ in range(args.rounds):
        if round_:
            cluster = calibrate(size_bytes=2**22, matmul_n=512)
            calibrations.append(cluster.to_dict())
            spreads.append(dict(calibrate.last_spread))
        round_times: dict[str, list[float]] = {name: [] for name in plans}
        for name, plan in plans.items():
            predictions[name].append(estimate(graph, replace(plan, cluster=cluster)))
        for _ in range(args.steps):  # one step of each layout in turn
            for name, trainer in trainers.items():
                round_times[name].append(trainer.step())
        for name, times in round_times.items():
            steps[name] += times
        round_steps.append({name: statistics.median(times) for name, times in round_times.items()})
        load.append(os.getloadavg()[0])
    # Identical plans (the automatic plan is often one of the pinned ones) are one layout: their steps are
    # pooled, so that the automatic/fastest ratio compares layouts, not two samples of the same one.
    layout = {name: {k: v for k, v in d.items() if k != "search"} for name, d in box[0].items()}  # not how found
    same = {name: [other for other in plans if layout[other] == layout[name]] for name in plans}
    rows = []
    for name, plan in plans.items():
        measured = statistics.median([t for other in same[name] for t in steps[other]])
        ps = predictions[name]
        predicted = statistics.median(p.step_time_s for p in ps)
        rows.append({"layout": name, "plan": f"{plan.mesh} {plan.data_parallel} {plan.schedule} "
                     f"mb={plan.microbatch_size}×{plan.microbatches} recompute={len(plan.recompute)}",
                     "predicted_s": predicted, "measured_s": measured,
                     "error": (predicted - measured) / measured, "steps_s": steps[name],
                     "same_plan_as": [other for other in same[name] if other != name],
                     "round_predicted_s": [p.step_time_s for p in ps],
                     "predicted_parts_s": {k: statistics.mean(getattr(p, f"{k}_s") for p in ps)
                                           for k in ("compute", "recompute", "comm", "bubble", "optimizer")}})
    if dist.get_rank() == 0:
        pinned = [r for r in rows if r["layout"] != "automatic"]
        auto = next(r for r in rows if r["layout"] == "automatic")
        fastest = min(pinned, key=lambda r: r["measured_s"])
        summary = {
            "spearman": spearman([r["predicted_s"] for r in pinned], [r["measured_s"] for r in pinned]),
            "median_abs_error": statistics.median(abs(r["error"]) for r in pinned),
            "automatic_over_fastest": auto["measured_s"] / fastest["measured_s"], "fastest": fastest["layout"],
            "rounds": [round_figures(rows, measured, k) for k, measured in enumerate(round_steps)],
            "load_average_1min": load, "calibration_spread": spreads,
            "comm_overlap": overlap, "calibrated": calibrations, "planned_on": planning,
        }
        for r in rows:
            parts = " ".join(f"{k} {v * 1e3:.0f}" for k, v in r["predicted_parts_s"].items() if v > 0)
            print(f"{r['layout']:>18} | {r['plan']:<48} | predicted {r['predicted_s'] * 1e3:7.1f} ms measured "
                  f"{r['measured_s'] * 1e3:7.1f} ms error {r['error']:+.0%} | {parts}"
                  + (f" | same plan as {', '.join(r['same_plan_as'])}" if r["same_plan_as"] else ""))
        for k, (c, figures) in enumerate(zip(calibrations, summary["rounds"])):
            d = c["device"]
            groups = "; ".join(f"{kind} " + ", ".join(f"n={n} {v * 1e6:.0f}" for n, v in pts.items())
                               for kind, pts in d.get("group_layer_overhead", {}).items())
            print(f"round {k}: load {load[k]:.1f}→{load[k + 1]:.1f}; calibrated concurrency "
                  f"{c.get('compute_concurrency', 0):.2f}, layer overhead {d['layer_overhead_s'] * 1e6:.0f} µs "
                  f"(+ {groups} µs), pipeline stage {d.get('pipeline_stage_overhead_s', 0) * 1e6:.0f} µs, recompute "
                  f"{d.get('recompute_overhead_s', 0) * 1e6:.0f} µs, fp32 {d['peak_flops']['fp32'] / 1e9:.1f} GFLOP/s; "
                  f"worst spread "
                  f"{max(spreads[k].values(), default=0):.2f}; alone: Spearman {figures['spearman']:.2f}, "
                  f"median |error| {figures['median_abs_error']:.0%}")
        print(f"all-reduce/compute overlap {overlap:.2f}")
        print(f"Spearman {summary['spearman']:.2f}; median |error| {summary['median_abs_error']:.0%}; automatic "
              f"{summary['automatic_over_fastest']:.2f}× the fastest pinned layout ({fastest['layout']})")
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows, **summary}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
