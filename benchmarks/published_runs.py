"""Predicted against published iteration times: Megatron-LM SC'21 Table 1 (Narayanan et al. 2021).

    python benchmarks/published_runs.py                 # every row, a table on stdout
    python benchmarks/published_runs.py --out runs.json # and the figures as JSON
    python benchmarks/published_runs.py --rows 1.7B,18B # some rows only

Each row of ``shared/calibration/megatron_sc21_table1.json`` (A100-80GB DGX nodes, sequence 2048, vocabulary
51,200, bf16/fp16 mixed precision, full recompute of every block) is rebuilt as the published run: a GPT of its
size traced on the meta device, the published mesh (tp × pp, the rest data parallel), micro-batch and global
batch, the schedule of ``examples/sc21/run_table_1.sh`` (interleaved with its layers per virtual stage where
it sets one, 1F1B otherwise), DDP, layers split evenly over the stages with the embedding on the first and the
head on the last. The plan is priced by :func:`autoplan.cost.plan_cost.estimate_breakdown` on the
``a100-80gb`` preset, unchanged: no figure here is fitted to the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import autoplan  # noqa: E402
from autoplan.cost.plan_cost import estimate_breakdown  # noqa: E402
from autoplan.models import Attention, Block, gpt  # noqa: E402
from autoplan.plan import Mesh, ModelInfo, Plan, SearchInfo, Stage  # noqa: E402

TABLE = Path(REPO.parent / "shared" / "calibration" / "megatron_sc21_table1.json")
SEQ_LEN = 2048
VOCAB = 51200
# Layers per virtual pipeline stage in NVIDIA/Megatron-LM examples/sc21/run_table_1.sh (interleaved schedule).
LAYERS_PER_VIRTUAL_STAGE = {"76B": 5, "145B": 5, "310B": 3, "530B": 1}


DROPOUT = 0.1  # Megatron-LM's attention and hidden dropout


class MegatronAttention(Attention):
    """Attention as Megatron-LM ran it in 2021: scores materialised, masked softmax, attention dropout, then the
    value product (no fused attention kernel), so the b·a·s² tensors are saved for backward and their softmax and
    dropout move 5·a·s²·b bytes (Korthikanti et al. 2022, §4.1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).unbind(dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        probs = F.dropout(scores.masked_fill(causal, float("-inf")).softmax(-1), DROPOUT, self.training)
        return self.proj((probs @ v).transpose(1, 2).reshape(B, T, -1))


class MegatronBlock(Block):
    """A GPT block with Megatron-LM's dropout after attention and after the MLP (before each residual add)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.attn(self.ln1(x)), DROPOUT, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), DROPOUT, self.training)


def load_rows(path: Path = TABLE) -> list[dict]:
    """The published rows (see the module docstring)."""
    return json.loads(path.read_text())["rows"]


def trace_row(row: dict) -> autoplan.ModelGraph:
    """The row's GPT with Megatron-LM's 2021 blocks (batch of one sequence) traced on the meta device."""
    model, inputs = gpt("gpt3-175b", batch_size=1, device="meta", vocab_size=VOCAB, seq_len=SEQ_LEN,
                        hidden=row["hidden"], layers=row["layers"], heads=row["heads"])
    for block in model.blocks:
        block.__class__ = MegatronBlock
        block.attn.__class__ = MegatronAttention
    return autoplan.trace(model, inputs)


def published_plan(graph: autoplan.ModelGraph, row: dict) -> Plan:
    """The published layout of ``row`` as a :class:`Plan` over ``graph`` (see the module docstring)."""
    tp, pp = row["tp"], row["pp"]
    dp = row["gpus"] // (tp * pp)
    per_rank = row["layers"] // pp
    virtual = per_rank // LAYERS_PER_VIRTUAL_STAGE[row["label"]] if row["label"] in LAYERS_PER_VIRTUAL_STAGE else 1
    stages_count = pp * virtual
    names = [layer.name for layer in graph.layers]
    blocks = [n for n in names if n.startswith("blocks.")]
    head_end = names.index(blocks[0])
    per_stage = len(blocks) // stages_count
    stages = []
    for k in range(stages_count):
        layers = blocks[k * per_stage:(k + 1) * per_stage]
        if k == 0:
            layers = names[:head_end] + layers
        if k == stages_count - 1:
            layers = layers + names[names.index(blocks[-1]) + 1:]
        stages.append(Stage(tuple(layers), tuple(b for b in layers if b.startswith("blocks."))))
    styles = {}
    if tp > 1:
        for layer in graph.layers:
            for group in layer.tp_groups:
                styles.update(group.styles)
    cluster = autoplan.Cluster.preset("a100-80gb", nodes=row["gpus"] // 8)
    microbatches = row["batch"] // (dp * row["mbs"])
    return Plan(
        model=ModelInfo("GPT", "published", graph.num_params), cluster=cluster, global_batch_size=row["batch"],
        microbatch_size=row["mbs"], microbatches=microbatches, mesh=Mesh(pp=pp, dp=dp, tp=tp),
        schedule="interleaved" if virtual > 1 else "1f1b", data_parallel="ddp", stages=tuple(stages),
        tensor_parallel=styles, precision="bf16", virtual_stages=virtual,
        search=SearchInfo(solver="manual", status="PINNED"),
    )


def predict_row(row: dict, graph: autoplan.ModelGraph | None = None) -> dict:
    """Predicted vs published iteration time of ``row`` with the split of the prediction."""
    graph = graph or trace_row(row)
    cost = estimate_breakdown(graph, published_plan(graph, row))
    slow = cost.slowest_rank
    m = cost.strategy.microbatches
    return {
        "label": row["label"], "tp": row["tp"], "pp": row["pp"], "dp": cost.strategy.dp, "gpus": row["gpus"],
        "mbs": row["mbs"], "microbatches": m, "virtual_stages": cost.strategy.virtual_stages,
        "published_s": row["iter_s"], "predicted_s": cost.step_time_s, "ratio": cost.step_time_s / row["iter_s"],
        "compute_s": cost.compute_s, "recompute_s": cost.recompute_s, "tp_comm_s": m * slow.tp_comm_s,
        "p2p_s": m * slow.p2p_s, "dp_sync_s": cost.comm_s - m * (slow.tp_comm_s + slow.p2p_s),
        "bubble_s": cost.bubble_s, "optimizer_s": cost.optimizer_s,
    }


def _line(r: dict) -> str:
    return (f"{r['label']:>5} tp{r['tp']} pp{r['pp']:<2} dp{r['dp']:<3} mb {r['mbs']:>2}×{r['microbatches']:<3} "
            f"v{r['virtual_stages']} | published {r['published_s']:6.2f} s predicted {r['predicted_s']:6.2f} s "
            f"ratio {r['ratio']:.2f} | compute {r['compute_s']:5.2f} recompute {r['recompute_s']:5.2f} "
            f"tp {r['tp_comm_s']:5.2f} p2p {r['p2p_s']:4.2f} dp {r['dp_sync_s']:4.2f} "
            f"bubble {r['bubble_s']:5.2f} opt {r['optimizer_s']:4.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--rows", help="comma-separated labels (default: every row)")
    args = parser.parse_args(argv)
    rows = load_rows()
    if args.rows:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - {r["label"] for r in rows})
        if unknown:
            parser.error(f"unknown rows {unknown}; the table has {[r['label'] for r in rows]}")
        rows = [r for r in rows if r["label"] in wanted]
    results = []
    for row in rows:
        start = time.perf_counter()
        result = predict_row(row)
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        print(_line(result), flush=True)
    worst = max(abs(r["ratio"] - 1) for r in results)
    print(f"worst |ratio − 1| = {worst:.3f} over {len(results)} rows")
    if args.out:
        Path(args.out).write_text(json.dumps({"source": json.loads(TABLE.read_text())["source"],
                                              "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
