"""Pipeline schedules: microbatches in flight and the bubble."""

import pytest

from autoplan.cost import bubble_microbatches, in_flight_microbatches


def test_gpipe_holds_every_microbatch():
    assert [in_flight_microbatches("gpipe", s, 4, 8) for s in range(4)] == [8, 8, 8, 8]


def test_1f1b_stage_s_holds_pp_minus_s():
    assert [in_flight_microbatches("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [in_flight_microbatches("1f1b", s, 4, 2) for s in range(4)] == [2, 2, 2, 1]
    assert in_flight_microbatches("1f1b", 0, 1, 5) == 1


def test_interleaved_follows_megatron_warmup():
    # rank s: 2(pp − 1 − s) + (v − 1)·pp warm-up chunks + 1, each chunk 1/v of the rank's layers.
    got = [in_flight_microbatches("interleaved", s, 4, 8, virtual_stages=2) for s in range(4)]
    assert got == [11, 9, 7, 5]
    # Rank 0 holds pp + (pp − 1)/v whole-rank microbatches
    # (Korthikanti et al. 2022: pp · (1 + (pp − 1)/(pp·v))).
    for pp, v in ((4, 2), (8, 4), (16, 3)):
        assert in_flight_microbatches("interleaved", 0, pp, 4 * pp, v) / v == pytest.approx(pp + (pp - 1) / v)
    # Never more than all chunks of all microbatches.
    assert in_flight_microbatches("interleaved", 0, 4, 4, virtual_stages=2) == 8
    assert in_flight_microbatches("interleaved", 1, 4, 8, virtual_stages=1) == 3


def test_bubble():
    assert bubble_microbatches("gpipe", 4) == 3
    assert bubble_microbatches("1f1b", 8) == 7
    assert bubble_microbatches("interleaved", 8, 4) == 1.75
    assert bubble_microbatches("1f1b", 1) == 0


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: in_flight_microbatches("zb", 0, 4, 8), "schedule"),
        (lambda: in_flight_microbatches("1f1b", 4, 4, 8), "stage"),
        (lambda: in_flight_microbatches("1f1b", 0, 4, 0), "microbatches"),
        (lambda: in_flight_microbatches("1f1b", 0, 4, 8, virtual_stages=2), "virtual_stages must be 1"),
        (lambda: bubble_microbatches("gpipe", 0), "pp"),
        (lambda: bubble_microbatches("interleaved", 4, 0), "virtual_stages"),
    ],
)
def test_bad_arguments_name_the_cause(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_interleaved_warmup_agrees_with_torch_schedule():
    # torch's ScheduleInterleaved1F1B computes its warm-up forwards with _get_warmup_ops (a private helper:
    # skip if a later torch renames it); after warm-up each step runs one more forward before a backward.
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    warmup_ops = getattr(schedules, "_get_warmup_ops", None)
    if warmup_ops is None:
        pytest.skip("this torch has no _get_warmup_ops")
    for pp, v, rounds in ((2, 2, 1), (4, 2, 2), (4, 3, 1), (8, 4, 3)):
        m = pp * rounds
        for rank in range(pp):
            torch_peak = min(warmup_ops(rank, v, pp, pp, m) + 1, m * v)
            assert in_flight_microbatches("interleaved", rank, pp, m, v) == torch_peak, (pp, v, m, rank)
