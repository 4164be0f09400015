"""GPT-3 175B on 1,024 A100s: the plan fits and its throughput is a plausible fraction of peak.

Planning speed is measured by benchmarks/planning_time.py, not asserted here: this machine is shared and noisy.
"""

import pytest

import autoplan
from autoplan.cost.plan_cost import estimate
from autoplan.models import GPTConfig, gpt3_175b
from autoplan.options import PlanOptions
from autoplan.solve import search


@pytest.fixture(scope="module")
def graph_175b():
    model, inputs = gpt3_175b()
    return autoplan.trace(model, inputs)


@pytest.mark.slow
def test_gpt3_175b_on_1024_a100(graph_175b):
    cluster = autoplan.Cluster.preset("a100-80gb", nodes=128)
    plan = search(graph_175b, cluster, PlanOptions(global_batch_size=1536))
    assert plan.search.status in ("OPTIMAL", "FEASIBLE")
    assert max(plan.predicted.peak_memory_bytes) <= cluster.device.usable_memory_bytes
    cfg = GPTConfig.preset("gpt3-175b")
    tokens = 1536 * cfg.seq_len
    # 6·N·tokens (dense) + 12·L·s·h·tokens (attention scores and values, forward + backward): Narayanan et al.
    # SC'21 Eq. 3 with three passes (forward + backward) instead of its four (which add recompute).
    flops = 6 * graph_175b.num_params * tokens + 12 * cfg.layers * cfg.seq_len * cfg.hidden * tokens
    mfu = flops / plan.predicted.step_time_s / (1024 * cluster.device.peak_flops["bf16"])
    assert 0.30 <= mfu <= 0.60, f"MFU {mfu:.2%}"
    assert estimate(graph_175b, plan) == plan.predicted
