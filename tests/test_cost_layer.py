"""layer_cost on hand-built layers: microbatch and precision scaling, TP sharding and comm, recompute."""

from dataclasses import replace

import pytest

from autoplan.cluster import Cluster, Device
from autoplan.cost import compute_s, layer_cost
from autoplan.graph import Layer, RecomputeOption, TensorParallelGroup

# A device doing exactly 1000 FLOP/s in every precision and 1000 B/s links with no latency: every figure
# below can be worked by hand. Its memory is so fast that the memory-bound term vanishes (tested on its own below).
_DEVICE = Device("unit", 2**30, {"fp32": 1000.0, "bf16": 1000.0, "fp16": 1000.0}, achievable_flops_fraction=1.0,
                 memory_bandwidth_Bps=1e30)
UNIT = Cluster(nodes=1, devices_per_node=8, device=_DEVICE, intra_node_bandwidth_Bps=1000.0,
               inter_node_bandwidth_Bps=100.0, intra_node_latency_s=0.0, inter_node_latency_s=0.0)

ATTN = TensorParallelGroup({"blocks.0.attn.qkv": "colwise", "blocks.0.attn.proj": "rowwise"}, divisor=4,
                           num_params=40, forward_flops=400, activation_bytes=200, output_bytes=64,
                           input_bytes=64)
MLP = TensorParallelGroup({"blocks.0.mlp.fc": "colwise", "blocks.0.mlp.proj": "rowwise"}, divisor=16,
                          num_params=50, forward_flops=500, activation_bytes=400, output_bytes=64,
                          input_bytes=64)
# pre-norm, as traced: nothing after each option's last projection saves a tensor
FULL = RecomputeOption("blocks.0", saved_activation_bytes=700, forward_flops=1000,
                       unreached=("blocks.0.mlp", "blocks.0.mlp.proj"))
SELECTIVE = RecomputeOption("blocks.0.attn", saved_activation_bytes=150, forward_flops=300,
                            unreached=("blocks.0.attn.proj",))
BLOCK = Layer("blocks.0", 1, "block", forward_flops=1000, backward_flops=2000, num_params=100, param_bytes=400,
              activation_bytes=800, output_bytes=64, tp_groups=(ATTN, MLP), recompute_options=(FULL, SELECTIVE))


def cost(layer=BLOCK, *, tp=1, microbatch_size=2, precision="fp32", recompute=None, cluster=UNIT, tp_stride=1):
    return layer_cost(layer, traced_batch_size=2, traced_dtype_bytes=4, cluster=cluster, tp=tp,
                      microbatch_size=microbatch_size, precision=precision, recompute=recompute,
                      tp_stride=tp_stride)


def test_compute_s_uses_achievable_fraction_of_peak():
    a100 = Cluster.preset("a100-80gb")
    assert compute_s(218.4e12, a100, "bf16") == pytest.approx(1.0)
    assert compute_s(13.65e12, a100, "fp32") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="precision"):
        compute_s(1.0, a100, "int8")


def test_as_traced():
    c = cost()
    assert (c.forward_s, c.backward_s, c.recompute_s, c.tp_comm_s) == (1.0, 2.0, 0.0, 0.0)
    assert (c.num_params, c.activation_bytes, c.transient_bytes, c.boundary_bytes) == (100, 800, 0, 64)
    assert c.total_s == 3.0


def test_layer_overhead_is_fixed_per_microbatch_and_doubled_in_backward():
    slow = Cluster(nodes=1, devices_per_node=8, device=replace(_DEVICE, layer_overhead_s=0.25),
                   intra_node_bandwidth_Bps=1000.0, intra_node_latency_s=0.0, inter_node_latency_s=0.0)
    c = cost(cluster=slow)
    assert (c.forward_s, c.backward_s, c.recompute_s) == (1.25, 2.5, 0.0)
    # The same 0.25 s at any microbatch size: four microbatches of 1 cost more than one of 4.
    one, four = cost(cluster=slow, microbatch_size=1), cost(cluster=slow, microbatch_size=4)
    assert (one.forward_s, four.forward_s) == (0.75, 2.25)
    assert 4 * one.total_s == pytest.approx(four.total_s + 3 * 3 * 0.25)
    # Recompute re-runs one forward, overhead included; TP leaves the overhead unsharded.
    assert cost(cluster=slow, recompute=FULL).recompute_s == pytest.approx(1.0 + 0.25)
    assert cost(cluster=slow, tp=4).forward_s == pytest.approx(0.25 + 0.25)
    # Without overhead (the default for a hand-built device) the figures are the FLOPs alone.
    assert (cost().forward_s, cost().backward_s) == (1.0, 2.0)


def test_microbatch_and_precision_scaling():
    c = cost(microbatch_size=4, precision="bf16")
    assert (c.forward_s, c.backward_s) == (2.0, 4.0)           # twice the samples
    assert (c.activation_bytes, c.boundary_bytes) == (800, 64)  # twice the samples at half the element size
    assert c.num_params == 100                                   # parameters do not scale with the batch
    small = cost(microbatch_size=1)
    assert (small.forward_s, small.activation_bytes, small.boundary_bytes) == (0.5, 400, 32)


def test_tensor_parallel_shards_groups_and_adds_two_allreduces_per_pair():
    c = cost(tp=2)
    assert c.num_params == 100 - 90 + 20 + 25
    # All of a layer with pairs shards: the 100 FLOPs outside the linears are attention's products, per head.
    assert c.forward_s == pytest.approx(1000 / 2 / 1000)
    assert c.backward_s == pytest.approx(2000 * 0.5 / 1000)        # in proportion to forward FLOPs
    assert c.activation_bytes == 800 - 600 + 300
    assert c.boundary_bytes == 64                                  # the layer output is replicated
    # Each colwise/rowwise pair: all-reduce of 64 B in forward and in backward, 2·1/2·64 B / 1000 B/s each.
    assert c.tp_comm_s == pytest.approx(2 * 2 * 0.064)


def test_tensor_parallel_degree_that_does_not_divide_leaves_layer_replicated():
    c = cost(tp=8)   # heads = 4: 8 does not divide
    assert (c.num_params, c.forward_s, c.activation_bytes, c.tp_comm_s) == (100, 1.0, 800, 0.0)
    assert cost(Layer("ln", 2, "norm", 10, 20, 2, 8, 16, 16), tp=4).tp_comm_s == 0.0  # no groups


def test_tensor_parallel_across_nodes_uses_inter_node_link():
    two_nodes = Cluster(nodes=2, devices_per_node=2, device=_DEVICE, intra_node_bandwidth_Bps=1000.0,
                        inter_node_bandwidth_Bps=100.0, intra_node_latency_s=0.0, inter_node_latency_s=0.0)
    assert cost(tp=2, tp_stride=1, cluster=two_nodes).tp_comm_s == pytest.approx(4 * 0.064)
    assert cost(tp=2, tp_stride=2, cluster=two_nodes).tp_comm_s == pytest.approx(4 * 0.64)


def test_full_recompute_keeps_only_the_replicated_input():
    c = cost(recompute=FULL)
    assert c.activation_bytes == 100
    assert c.transient_bytes == 700
    assert c.recompute_s == pytest.approx(1.0)
    assert c.total_s == pytest.approx(4.0)
    tp = cost(tp=4, recompute=FULL)
    # TP activations 800 − 600 + 150 = 350; the input (100 B) is not sharded.
    assert (tp.activation_bytes, tp.transient_bytes) == (100, 250)
    assert tp.recompute_s == pytest.approx(1000 * 0.25 / 1000)    # forward FLOPs at tp=4: 1000/4
    # Two pairs × (forward + backward) + the first pair's forward all-reduce again while recomputing (the last
    # one feeds no saved tensor, so checkpointing's early stop skips it); 2·3/4·64 B each.
    assert tp.tp_comm_s == pytest.approx(5 * 0.096)
    # Post-norm (the last norm saves the sum): the recomputation reaches the last all-reduce too.
    post = cost(tp=4, recompute=replace(FULL, unreached=("blocks.0.ln2",)))
    assert post.tp_comm_s == pytest.approx(6 * 0.096)


def test_selective_recompute_frees_its_bytes_as_sharded_when_they_fit_in_the_pairs():
    c = cost(recompute=SELECTIVE)
    assert (c.activation_bytes, c.transient_bytes, c.recompute_s) == (650, 150, pytest.approx(0.3))
    tp = cost(tp=2, recompute=SELECTIVE)
    # 500 B after TP (200 outside the pairs, 600/2 inside). The option's 150 B fit in the pairs' 600, so they are
    # taken as sharded: each rank frees 75 (an average share, 150 × 500/800 = 94, over-states what a core inside
    # a pair frees, and the predicted memory would fall below what the rank keeps).
    assert (tp.activation_bytes, tp.transient_bytes) == (425, 75)
    assert tp.recompute_s == pytest.approx(300 * 0.5 / 1000)
    # The attention pair is the module's last: its all-reduce is not re-run, so no collective is added.
    assert tp.tp_comm_s == pytest.approx(4 * 0.064)


def test_recompute_scales_with_microbatch_and_precision():
    c = cost(recompute=FULL, microbatch_size=4, precision="bf16")
    assert (c.activation_bytes, c.transient_bytes) == (100, 700)
    assert c.recompute_s == pytest.approx(2.0)


def test_recompute_never_goes_negative():
    greedy = RecomputeOption("blocks.0", saved_activation_bytes=10_000, forward_flops=1000)
    assert cost(recompute=greedy).activation_bytes == 0


def test_vocab_parallel_embedding_allreduces_its_output_in_forward_only():
    group = TensorParallelGroup({"tok": "vocab_embedding"}, divisor=100, num_params=1000, forward_flops=0,
                                activation_bytes=0, output_bytes=80, input_bytes=16)  # int64 token ids
    tok = Layer("tok", 0, "embedding", 0, 0, 1000, 4000, 0, 80, tp_groups=(group,))
    c = cost(tok, tp=2)
    assert c.num_params == 500
    assert c.tp_comm_s == pytest.approx(80 / 1000)   # 2·1/2·80 B / 1000 B/s


def test_vocab_parallel_head_gathers_logits_and_allreduces_input_gradient():
    # 2 samples × 1 token, hidden 10, vocabulary 100: input 80 B, logits 800 B, 4000 forward FLOPs.
    group = TensorParallelGroup({"head": "vocab_head"}, divisor=100, num_params=1000, forward_flops=4000,
                                activation_bytes=0, output_bytes=800, input_bytes=80)
    head = Layer("head", 3, "linear", 4000, 8000, 1000, 4000, 80, 800, tp_groups=(group,))
    c = cost(head, tp=2)
    assert c.num_params == 500
    assert c.forward_s == pytest.approx(2.0)
    # all-gather of 800 B logits: 1/2·800/1000; all-reduce of the 80 B input gradient: 2·1/2·80/1000
    assert c.tp_comm_s == pytest.approx(0.4 + 0.08)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(tp=0), "tp must be a positive int"),
        (dict(microbatch_size=0), "microbatch_size"),
        (dict(precision="int8"), "precision"),
        (dict(recompute=RecomputeOption("blocks.1", 1, 1)), "does not belong to layer"),
        (dict(tp=2, tp_stride=8), "world size"),
    ],
)
def test_bad_arguments_name_the_cause(kwargs, words):
    with pytest.raises(ValueError, match=words):
        cost(**kwargs)


def test_tied_head_owns_no_parameters_to_shard():
    # The head's weight is the embedding's (counted there): its group names 1000 parameters, the layer owns 0.
    group = TensorParallelGroup({"head": "vocab_head"}, divisor=100, num_params=1000, forward_flops=4000,
                                activation_bytes=0, output_bytes=800, input_bytes=80)
    head = Layer("head", 3, "linear", 4000, 8000, 0, 0, 80, 800, tp_groups=(group,))
    assert cost(head, tp=2).num_params == 0
    assert cost(head, tp=2).tp_comm_s == pytest.approx(0.48)


def test_memory_bound_passes_over_the_saved_activations():
    """Outside matmuls, forward moves 2 bytes and backward 3 per byte saved (after TP), full recompute 2 more per
    byte it frees; here at 100 B/s."""
    slow = Cluster(nodes=1, devices_per_node=8, device=replace(_DEVICE, memory_bandwidth_Bps=100.0),
                   intra_node_bandwidth_Bps=1000.0, inter_node_bandwidth_Bps=100.0, intra_node_latency_s=0.0,
                   inter_node_latency_s=0.0)
    fast, timed = cost(), cost(cluster=slow)
    assert timed.forward_s - fast.forward_s == pytest.approx(2 * 800 / 100)
    assert timed.backward_s - fast.backward_s == pytest.approx(3 * 800 / 100)
    full_fast, full_timed = cost(recompute=FULL), cost(recompute=FULL, cluster=slow)
    assert full_timed.recompute_s - full_fast.recompute_s == pytest.approx(2 * 700 / 100)


def test_attention_products_shard_with_the_pairs():
    """The layer's matmul FLOPs outside its pairs' linears (attention's QKᵀ and softmax·V, 100 of 1000 here) run
    on the rank's own heads: with tp=2 the whole forward halves."""
    assert cost(tp=2).forward_s == pytest.approx(cost().forward_s / 2)
