"""Check the cost model on one CUDA device: predicted vs measured peak memory and time of a training step,
and the fraction of peak a large bf16 matmul reaches.

What it does, for each precision asked (fp32, and bf16 = torch.autocast(bfloat16) over fp32 weights):

1. builds ``autoplan.models.GPT`` of a named size on the GPU, and a copy on the meta device that it traces
   with ``autoplan.trace`` (no real memory);
2. predicts the peak memory of one step with the planner's own cost, :func:`autoplan.cost.plan_cost.compose`
   of a one-device layout: model states (weights, gradients, AdamW m and v:
   :func:`~autoplan.cost.model_state_bytes`) + the activations every layer keeps for backward + the largest
   transient (:func:`~autoplan.cost.layer_cost`) + the loss's buffers (cross-entropy over the logits runs in
   fp32: its log-probabilities, their gradient and the logits' gradient, 3 × logits × 4 bytes) + under bf16
   autocast the bf16 copy of the matmul weights saved for backward
   (:func:`~autoplan.cost.autocast_weight_copy_bytes`);
3. runs one warm-up step (creating the optimizer states) and then measures the peak of a second step with
   ``torch.cuda.max_memory_allocated``; gradients are zeroed, not freed (``zero_grad(set_to_none=False)``), as
   under DDP, so weights, gradients and states are all alive, which is what the model-state formula counts;
   AdamW is ``fused=True``: no per-step temporaries (what :func:`~autoplan.cost.optimizer_step_s` assumes);
4. times a few steps and compares with the predicted compute + optimizer time on the detected cluster;
5. times an 8192³ bf16 matmul and reports the achieved fraction of the h100-80gb preset's peak.

Usage (one GPU, < 2 minutes)::

    python benchmarks/gpu_memory_check.py --out gpu_check.json
    python benchmarks/gpu_memory_check.py --model gpt2-125m --batch 4 --precision bf16
    python benchmarks/gpu_memory_check.py --model debug --batch 4 --device cpu   # dry run, no GPU
    python benchmarks/gpu_memory_check.py --device fake    # memory only, full size, fake tensors, no GPU

Without CUDA (and without ``--device cpu``) it prints why and exits with status 0 without measuring (``--out``
then records ``"status": "skipped"``). TF32 stays off (PyTorch's default), so fp32 runs at the fp32 peak
the presets list.

Example (the prediction alone runs anywhere):
    >>> import torch, autoplan
    >>> from autoplan.models import GPT, GPTConfig
    >>> graph = autoplan.trace(GPT(GPTConfig()), torch.randint(0, 256, (2, 16)))
    >>> parts = predict_step_memory(graph, microbatch_size=4, precision="fp32")
    >>> parts["total_bytes"] == sum(v for k, v in parts.items() if k != "total_bytes")
    True
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoplan  # noqa: E402
from autoplan.cluster import Cluster  # noqa: E402
from autoplan.cost.plan_cost import PlanCost, Strategy, compose, layer_choice_cost  # noqa: E402
from autoplan.explain import format_bytes, format_seconds  # noqa: E402
from autoplan.graph import ModelGraph  # noqa: E402
from autoplan.models import GPT, GPTConfig  # noqa: E402

GOAL_RELATIVE_ERROR = 0.10


def _one_device_step(graph: ModelGraph, cluster: Cluster, microbatch_size: int, precision: str,
                     optimizer: str) -> PlanCost:
    """:func:`autoplan.cost.plan_cost.compose` of one microbatch through every layer on one device (no DP, TP or
    PP): what one training step of the whole model costs."""
    strategy = Strategy(pp=1, dp=1, tp=1, microbatch_size=microbatch_size, microbatches=1, schedule="1f1b",
                        data_parallel="ddp", precision=precision, optimizer=optimizer)
    layers = [layer_choice_cost(graph, layer, cluster, strategy, False, None) for layer in graph.layers]
    return compose(strategy, cluster, [layers], global_batch_size=microbatch_size)


def predict_step_memory(graph: ModelGraph, *, microbatch_size: int, precision: str,
                        optimizer: str = "adamw") -> dict[str, int]:
    """Peak bytes of one training step of ``graph`` on one device, by part, from the cost model's ``compose``.

    Model states, the activations every layer keeps for backward, the largest transient, the loss's buffers
    (cross-entropy over the last layer's output) and, under bf16 autocast, the weight copy.

    Example:
        >>> import torch, autoplan
        >>> from autoplan.models import GPT, GPTConfig
        >>> g = autoplan.trace(GPT(GPTConfig()), torch.randint(0, 256, (2, 16)))
        >>> predict_step_memory(g, microbatch_size=2, precision="fp32")["model_states_bytes"]
        546816
    """
    cluster = Cluster.preset("h100-80gb")  # memory does not depend on the cluster's rates
    rank = _one_device_step(graph, cluster, microbatch_size, precision, optimizer).ranks[0]
    parts = {
        "model_states_bytes": rank.model_state_bytes,
        "activations_bytes": rank.activation_bytes,
        "transient_bytes": rank.transient_bytes,
        "loss_bytes": rank.loss_bytes,
        "weight_copy_bytes": rank.weight_copy_bytes,
    }
    parts["total_bytes"] = sum(parts.values())  # = rank.peak_bytes: one device has no pipeline buffers
    return parts


def predict_step_time_s(graph: ModelGraph, cluster: Cluster, *, microbatch_size: int, precision: str) -> float:
    """Forward + backward of every layer plus the AdamW update, on one device of ``cluster`` (``compose``'s
    step time for one device)."""
    return _one_device_step(graph, cluster, microbatch_size, precision, "adamw").step_time_s


def train_step(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
               optimizer: torch.optim.Optimizer, precision: str) -> None:
    """One step; the logits are not kept alive outside the loss (as in a training loop's single expression)."""
    autocast = (torch.autocast(tokens.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else nullcontext())
    with autocast:
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=False if not fused else None)


def _cpu_step_peak_bytes(model, tokens, targets, optimizer, precision: str) -> int:
    """Peak bytes of one CPU step by torch's MemTracker, which follows every storage as the CUDA allocator's
    counter does (a private torch tool: this path is only the dry run)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer, tokens, targets)
    with tracker:
        train_step(model, tokens, targets, optimizer, precision)
    return max(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_step(cfg: GPTConfig, batch: int, precision: str, device: str = "cuda",
                 timed_steps: int = 3) -> dict[str, float | None]:
    """Peak allocated bytes of one step (after a warm-up step) and the mean time of ``timed_steps`` steps.

    ``device`` "cuda" measures with the CUDA allocator; "cpu" runs the step for real under MemTracker; "fake"
    runs it on fake tensors under MemTracker (full-size models on any machine, CPU kernels' saved tensors,
    no time).
    """
    if device == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            model = GPT(cfg)
            tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
            targets = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
            optimizer = make_optimizer(model)
            train_step(model, tokens, targets, optimizer, precision)  # creates AdamW states and gradients
            peak = _cpu_step_peak_bytes(model, tokens, targets, optimizer, precision)
        return {"peak_allocated_bytes": peak, "peak_reserved_bytes": None, "step_s": None}
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    optimizer = make_optimizer(model)
    train_step(model, tokens, targets, optimizer, precision)  # creates AdamW states and gradients
    reserved = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, tokens, targets, optimizer, precision)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        peak = _cpu_step_peak_bytes(model, tokens, targets, optimizer, precision)
    start = time.perf_counter()
    for _ in range(timed_steps):
        train_step(model, tokens, targets, optimizer, precision)
    _synchronize(device)
    step_s = (time.perf_counter() - start) / timed_steps
    del model, optimizer, tokens, targets
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"peak_allocated_bytes": peak, "peak_reserved_bytes": reserved, "step_s": step_s}


def matmul_fraction(n: int = 8192, iters: int = 20) -> dict[str, float]:
    """Achieved bf16 FLOP/s of an n×n×n matmul and its fraction of the h100-80gb preset's peak."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    achieved = 2 * n**3 / seconds
    peak = Cluster.preset("h100-80gb").device.peak_flops["bf16"]
    return {"n": n, "seconds": seconds, "achieved_flops": achieved, "h100_peak_flops": peak,
            "fraction_of_h100_peak": achieved / peak}


def check(model_name: str, batch: int, precisions: list[str], device: str = "cuda") -> dict:
    """Predict and measure every precision; the whole result as plain data. ``device="cpu"`` is a dry run of
    the same path (memory by MemTracker, no matmul timing); ``"fake"`` measures memory only (see
    :func:`measure_step`)."""
    cfg = GPTConfig.preset(model_name)
    with torch.device("meta"):
        meta_model = GPT(cfg)
    start = time.perf_counter()
    graph = autoplan.trace(meta_model, torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), device="meta"))
    trace_s = time.perf_counter() - start
    cluster = Cluster.detect()
    rows = []
    for precision in precisions:
        predicted = predict_step_memory(graph, microbatch_size=batch, precision=precision)
        measured = measure_step(cfg, batch, precision, device)
        predicted_s = predict_step_time_s(graph, cluster, microbatch_size=batch, precision=precision)
        rows.append({
            "precision": precision,
            "predicted": predicted,
            "measured": measured,
            "memory_relative_error": predicted["total_bytes"] / measured["peak_allocated_bytes"] - 1,
            "predicted_step_s": predicted_s,
            "time_relative_error": predicted_s / measured["step_s"] - 1 if measured["step_s"] else None,
        })
    return {
        "status": "measured",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
        "cluster": cluster.name,
        "torch": torch.__version__,
        "model": model_name,
        "num_params": graph.num_params,
        "batch": batch,
        "seq_len": cfg.seq_len,
        "trace_s": trace_s,
        "goal_memory_relative_error": GOAL_RELATIVE_ERROR,
        "steps": rows,
        "matmul": matmul_fraction() if device == "cuda" else None,
    }


def format_result(result: dict) -> str:
    """A readable table of :func:`check`'s result."""
    lines = [f"{result['device']} ({result['cluster']}), torch {result['torch']}; {result['model']} "
             f"({result['num_params'] / 1e6:.0f}M params), batch {result['batch']} × {result['seq_len']} tokens; "
             f"trace {result['trace_s']:.1f} s",
             f"{'precision':<10}{'states':>12}{'activations':>14}{'transient':>12}{'loss':>12}{'w copy':>12}"
             f"{'predicted':>12}"
             f"{'measured':>12}{'error':>8}{'pred step':>11}{'meas step':>11}{'error':>8}"]
    for row in result["steps"]:
        p, m = row["predicted"], row["measured"]
        lines.append(
            f"{row['precision']:<10}{format_bytes(p['model_states_bytes']):>12}"
            f"{format_bytes(p['activations_bytes']):>14}{format_bytes(p['transient_bytes']):>12}"
            f"{format_bytes(p['loss_bytes']):>12}{format_bytes(p.get('weight_copy_bytes', 0)):>12}"
            f"{format_bytes(p['total_bytes']):>12}"
            f"{format_bytes(m['peak_allocated_bytes']):>12}{row['memory_relative_error']:>+8.1%}"
            + (f"{format_seconds(row['predicted_step_s']):>11}{format_seconds(m['step_s']):>11}"
               f"{row['time_relative_error']:>+8.1%}" if m["step_s"] else f"{'-':>11}{'-':>11}{'-':>8}")
        )
    mm = result["matmul"]
    if mm is None:
        return "\n".join(lines)
    lines.append(f"bf16 matmul {mm['n']}³: {mm['achieved_flops'] / 1e12:.0f} TFLOP/s = "
                 f"{mm['fraction_of_h100_peak']:.1%} of the h100-80gb preset's {mm['h100_peak_flops'] / 1e12:.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-350m", help="a GPTConfig preset (default gpt-350m)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "fake"],
                        help="cpu: a dry run on this machine (use a small --model); fake: memory only, any size, "
                             "on fake tensors")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be ≥ 1, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_memory_check: no CUDA device is available, so nothing was measured; run it on a machine "
              "with a GPU (python benchmarks/gpu_memory_check.py --out result.json).")
        if args.out:
            args.out.write_text(json.dumps({"status": "skipped", "reason": "no CUDA device"}, indent=2))
        return 0
    result = check(args.model, args.batch, args.precision, args.device)
    print(format_result(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
