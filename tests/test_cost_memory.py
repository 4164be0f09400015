"""Model-state bytes: ZeRO's per-parameter accounting and its sharding stages."""

import pytest

from autoplan.cost import StateBytes, model_state_bytes, state_bytes_per_param, zero_model_state_bytes


@pytest.mark.parametrize(
    "precision, optimizer, expected",
    [
        ("fp32", "adamw", StateBytes(4, 4, 8)),
        ("bf16", "adamw", StateBytes(2, 2, 12)),
        ("fp16", "adamw", StateBytes(2, 2, 12)),
        ("fp32", "sgd", StateBytes(4, 4, 4)),
        ("bf16", "sgd", StateBytes(2, 2, 8)),
    ],
)
def test_state_bytes_per_param(precision, optimizer, expected):
    assert state_bytes_per_param(precision, optimizer) == expected


def test_adamw_is_16_bytes_in_every_precision():
    assert {state_bytes_per_param(p, "adamw").total for p in ("fp32", "bf16", "fp16")} == {16}


def test_zero_paper_figure_1():
    # ZeRO (Rajbhandari et al. 2020) Figure 1: Ψ = 7.5B, N_d = 64, K = 12 → 120 / 31.4 / 16.6 / 1.9 GB.
    expected_gb = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected_gb.items():
        got_gb = zero_model_state_bytes(7_500_000_000, 64, stage, "bf16", "adamw") / 1e9
        # The paper prints one decimal (1.875 GB → "1.9"): within half a unit of the last digit.
        assert abs(got_gb - gb) <= 0.05, (stage, got_gb)
    assert zero_model_state_bytes(7_500_000_000, 64, 3) == 7_500_000_000 // 64 * 16


def test_zero_stages_are_exact_sums():
    psi, dp = 1000, 8
    assert zero_model_state_bytes(psi, dp, 0) == 16 * psi
    assert zero_model_state_bytes(psi, dp, 1) == 4 * psi + 12 * psi // dp
    assert zero_model_state_bytes(psi, dp, 2) == 2 * psi + 14 * psi // dp
    assert zero_model_state_bytes(psi, dp, 3) == 16 * psi // dp


def test_uneven_shards_round_up():
    # 10 parameters over 4 ranks: the largest shard holds 3.
    assert zero_model_state_bytes(10, 4, 3) == 3 * 16


def test_model_state_bytes_ddp_and_fsdp():
    assert model_state_bytes(1_000_000, "fp32", "adamw", dp=8, data_parallel="ddp") == 16_000_000
    assert model_state_bytes(1_000_000, "fp32", "adamw", dp=8, data_parallel="fsdp") == 2_000_000
    assert model_state_bytes(1_000_000, "bf16", "sgd", dp=4, data_parallel="fsdp") == 3_000_000
    assert model_state_bytes(0, "bf16", "adamw", dp=4, data_parallel="fsdp") == 0


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: state_bytes_per_param("fp8", "adamw"), "precision"),
        (lambda: state_bytes_per_param("bf16", "lion"), "optimizer"),
        (lambda: zero_model_state_bytes(100, 0, 1), "dp"),
        (lambda: zero_model_state_bytes(100, 2, 4), "stage"),
        (lambda: zero_model_state_bytes(-1, 2, 1), "num_params"),
        (lambda: model_state_bytes(100, "bf16", "adamw", dp=2, data_parallel="zero2"), "data_parallel"),
    ],
)
def test_bad_arguments_name_the_cause(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_cross_entropy_keeps_three_fp32_logit_tensors():
    from autoplan.cost import cross_entropy_bytes

    assert cross_entropy_bytes(1000) == 12_000
    assert cross_entropy_bytes(0) == 0
    with pytest.raises(ValueError, match="logits_elements"):
        cross_entropy_bytes(-1)
