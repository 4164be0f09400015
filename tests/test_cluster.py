"""Cluster and Device: presets with vendor figures, explicit construction, validation, JSON, detection."""

import json

import pytest

from autoplan.cluster import PRESETS, Cluster, Device, _preset_for_gpu

GiB = 2**30
FLOPS = {"fp32": 1e12, "bf16": 4e12, "fp16": 4e12}


@pytest.mark.parametrize(
    "name, memory_bytes, bf16_flops, fp32_flops, memory_Bps, nvlink_Bps, nic_Bps",
    [
        ("a100-40gb", 40 * GiB, 312e12, 19.5e12, 1.555e12, 300e9, 25e9),
        ("a100-80gb", 80 * GiB, 312e12, 19.5e12, 2.039e12, 300e9, 25e9),
        ("h100-80gb", 80 * GiB, 989e12, 67e12, 3.35e12, 450e9, 50e9),
        ("h200-141gb", 141e9, 989e12, 67e12, 4.8e12, 450e9, 50e9),
    ],
)
def test_gpu_presets_carry_datasheet_figures(name, memory_bytes, bf16_flops, fp32_flops, memory_Bps,
                                             nvlink_Bps, nic_Bps):
    c = Cluster.preset(name, nodes=2)
    assert (c.nodes, c.devices_per_node, c.world_size, c.name) == (2, 8, 16, name)
    d = c.device
    assert d.memory_bytes == memory_bytes and d.kind == "cuda"
    assert d.peak_flops == {"fp32": fp32_flops, "bf16": bf16_flops, "fp16": bf16_flops}
    assert d.memory_bandwidth_Bps == memory_Bps
    assert (c.intra_node_bandwidth_Bps, c.inter_node_bandwidth_Bps) == (nvlink_Bps, nic_Bps)
    assert 0 < d.usable_memory_bytes < d.memory_bytes
    assert c.intra_node_latency_s < c.inter_node_latency_s


def test_cpu_preset_and_devices_per_node_override():
    c = Cluster.preset("cpu", devices_per_node=2)
    assert (c.world_size, c.device.kind) == (2, "cpu")
    assert c.device.memory_bytes > c.device.memory_headroom_bytes > 0
    assert Cluster.preset("h100-80gb", nodes=3, devices_per_node=4).world_size == 12


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="a100-80gb"):
        Cluster.preset("v100")


def test_explicit_construction_and_achievable_flops():
    d = Device("toy", 16 * GiB, FLOPS, achievable_flops_fraction=0.25, memory_headroom_bytes=GiB)
    c = Cluster(nodes=2, devices_per_node=4, device=d, intra_node_bandwidth_Bps=100e9)
    assert c.world_size == 8
    assert c.device.achievable_flops("bf16") == 1e12
    assert c.device.usable_memory_bytes == 15 * GiB
    assert (c.inter_node_bandwidth_Bps, c.name) == (25e9, "custom")
    with pytest.raises(ValueError, match="precision"):
        d.achievable_flops("int8")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(memory_bytes=0), "memory_bytes"),
        (dict(peak_flops={"fp32": 1e12}), "missing"),
        (dict(peak_flops={"fp32": 1e12, "bf16": 0.0, "fp16": 1e12}), "positive"),
        (dict(achievable_flops_fraction=0.0), "achievable_flops_fraction"),
        (dict(achievable_flops_fraction=1.5), "achievable_flops_fraction"),
        (dict(memory_headroom_bytes=16 * GiB), "memory_headroom_bytes"),
        (dict(memory_bandwidth_Bps=0), "memory_bandwidth_Bps"),
        (dict(kind="tpu"), "kind"),
        (dict(layer_overhead_s=-1e-6), "layer_overhead_s"),
    ],
)
def test_bad_device_values_name_the_field(kwargs, words):
    args = dict(name="toy", memory_bytes=16 * GiB, peak_flops=FLOPS) | kwargs
    with pytest.raises(ValueError, match=words):
        Device(**args)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(nodes=0), "nodes"),
        (dict(devices_per_node=2.5), "devices_per_node"),
        (dict(device="a100"), "Device"),
        (dict(intra_node_bandwidth_Bps=0), "intra_node_bandwidth_Bps"),
        (dict(inter_node_bandwidth_Bps=-1), "inter_node_bandwidth_Bps"),
        (dict(inter_node_latency_s=-1e-6), "inter_node_latency_s"),
    ],
)
def test_bad_cluster_values_name_the_field(kwargs, words):
    args = dict(nodes=1, devices_per_node=8, device=Device("toy", 16 * GiB, FLOPS)) | kwargs
    with pytest.raises(ValueError, match=words):
        Cluster(**args)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_and_json_round_trip(name):
    c = Cluster.preset(name, nodes=2)
    assert Cluster.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_presets_charge_a_per_layer_overhead_and_old_dicts_load_without_it():
    gpu, cpu = Cluster.preset("a100-80gb"), Cluster.preset("cpu")
    assert 10e-6 <= gpu.device.layer_overhead_s <= 100e-6      # tens of µs per block on a GPU
    assert cpu.device.layer_overhead_s > gpu.device.layer_overhead_s
    assert Device("toy", 16 * GiB, FLOPS).layer_overhead_s == 0.0
    old = gpu.to_dict()
    del old["device"]["layer_overhead_s"]                        # written before the field existed
    assert Cluster.from_dict(old).device.layer_overhead_s == 0.0
    # A device without overhead writes the same keys as before; a round trip keeps a non-zero one.
    assert "layer_overhead_s" not in Cluster.from_dict(old).to_dict()["device"]
    assert Cluster.from_dict(json.loads(json.dumps(gpu.to_dict()))).device.layer_overhead_s == 50e-6
    assert hash(gpu) != hash(Cluster.from_dict(old))


def test_from_dict_names_unknown_and_missing_keys():
    d = Cluster.preset("a100-80gb").to_dict()
    with pytest.raises(ValueError, match="unknown keys \\['gpus'\\]"):
        Cluster.from_dict(d | {"gpus": 8})
    no_nodes = {k: v for k, v in d.items() if k != "nodes"}
    with pytest.raises(ValueError, match="lacks required keys \\['nodes'\\]"):
        Cluster.from_dict(no_nodes)
    with pytest.raises(ValueError, match="'device'"):
        Cluster.from_dict({"nodes": 1})


def test_clusters_are_hashable_cache_keys():
    assert len({Cluster.preset("a100-80gb"), Cluster.preset("a100-80gb"), Cluster.preset("h100-80gb")}) == 2


@pytest.mark.parametrize(
    "gpu, memory_bytes, preset",
    [
        ("NVIDIA H100 80GB HBM3", 80 * GiB, "h100-80gb"),
        ("NVIDIA H200", 141 * 10**9, "h200-141gb"),
        ("NVIDIA A100-SXM4-40GB", 40 * GiB, "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", 80 * GiB, "a100-80gb"),
        ("Tesla V100-SXM2-32GB", 32 * GiB, None),
    ],
)
def test_gpu_names_map_to_presets(gpu, memory_bytes, preset):
    assert _preset_for_gpu(gpu, memory_bytes) == preset


def test_detect_reads_torchrun_environment(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    c = Cluster.detect()
    assert (c.nodes, c.devices_per_node, c.world_size, c.device.kind) == (2, 4, 8, "cpu")
    # ranks on one machine share its memory
    assert c.device.memory_bytes == Cluster.preset("cpu").device.memory_bytes // 4


def test_detect_outside_torchrun_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert Cluster.detect().world_size == 1


@pytest.mark.parametrize("world, local, words", [("8", "3", "multiple"), ("two", "1", "not an integer")])
def test_detect_rejects_inconsistent_environment(monkeypatch, world, local, words):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    with pytest.raises(ValueError, match=words):
        Cluster.detect()
