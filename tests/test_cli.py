"""The autoplan command line: plan, show, calibrate, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from autoplan.cli import load_factory, main, parse_mesh


def test_plan_writes_json_and_show_prints_it(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "autoplan.models:gpt_debug", "--cluster", "cpu", "--devices-per-node", "2",
                 "--precision", "fp32", "--mesh", "dp=2", "--json", str(out), "--explain"]) == 0
    printed = capsys.readouterr().out
    assert "pp1 × dp2 × tp1" in printed and "Cost split" in printed and f"plan written to {out}" in printed
    assert json.loads(out.read_text())["mesh"] == {"pp": 1, "dp": 2, "tp": 1}
    assert main(["show", str(out)]) == 0
    assert "GPT (34.18K params) on 2 × cpu" in capsys.readouterr().out


def test_plan_passes_fsdp_resharding_and_expert_parallelism(capsys):
    assert main(["plan", "autoplan.models:gpt_debug", "--cluster", "cpu", "--devices-per-node", "2",
                 "--precision", "fp32", "--fsdp-reshard", "microbatch", "--expert-parallel", "off",
                 "--global-batch", "8", "--microbatch-size", "1"]) == 0
    assert "resharded every microbatch" in capsys.readouterr().out
    assert main(["plan", "autoplan.models:gpt_debug", "--cluster", "cpu", "--devices-per-node", "2",
                 "--expert-parallel", "on"]) == 2
    assert "experts" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["show", "/nonexistent/plan.json"], "no plan file at /nonexistent/plan.json"),
    (["plan", "autoplan.models"], "must be MODULE:FACTORY"),
    (["plan", "autoplan.models:missing"], "has no callable 'missing'"),
    (["plan", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    (["plan", "autoplan.models:gpt_debug", "--cluster", "tpu"], "unknown cluster preset 'tpu'"),
    (["plan", "autoplan.models:gpt_debug", "--cluster", "cpu", "--mesh", "dp=3"], "multiply to 3"),
])
def test_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("autoplan: error:")


def test_infeasible_plan_is_reported_not_raised(tmp_path, capsys):
    factory = tmp_path / "big_factory.py"
    factory.write_text("from autoplan.models import gpt\n"
                       "def make():\n    return gpt('gpt-6.7b', batch_size=1, device='meta')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        code = main(["plan", "big_factory:make", "--cluster", "a100-40gb", "--devices-per-node", "1",
                     "--data-parallel", "ddp", "--recompute", "none"])
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 2
    err = capsys.readouterr().err
    assert "InfeasiblePlanError" in err and "per device" in err


def test_bad_mesh_and_factories():
    with pytest.raises(ValueError, match="AXIS=N"):
        parse_mesh("pp8")
    model, inputs = load_factory("autoplan.models:gpt_debug")
    assert inputs[0].shape[0] == 8


@pytest.mark.slow
def test_python_dash_m_runs_the_same_command_line():
    result = subprocess.run([sys.executable, "-m", "autoplan", "show", "/nonexistent.json"], capture_output=True,
                            text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert result.returncode == 2 and "no plan file" in result.stderr


def test_calibrate_hands_its_arguments_to_autoplan_calibrate(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("autoplan.calibrate")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "autoplan.calibrate", fake)
    assert main(["calibrate", "--out", "x.json"]) == 0
    assert seen == [["--out", "x.json"]]


def test_calibrate_without_an_entry_point_is_a_clear_error(monkeypatch, capsys):
    import types

    monkeypatch.setitem(sys.modules, "autoplan.calibrate", types.ModuleType("autoplan.calibrate"))
    assert main(["calibrate"]) == 2
    assert "calibration is not available" in capsys.readouterr().err
