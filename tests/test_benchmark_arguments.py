"""The quality benchmark's command line: checked at the start, and never overwriting the committed results."""

import importlib.util
import pathlib

import pytest

BENCHMARK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "quality_benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("quality_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def region_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))  # it imports its sibling benchmarks by name
    spec = importlib.util.spec_from_file_location("region_confinement_benchmark",
                                                  BENCHMARK.parent / "region_confinement_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def with_matplotlib(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object() if name == "matplotlib"
                        else found(name, *rest))


def test_default_settings_write_the_committed_results_and_others_do_not(benchmark, with_matplotlib):
    assert pathlib.Path(benchmark.parse_arguments([]).out) == benchmark.COMMITTED_RESULTS
    other = pathlib.Path(benchmark.parse_arguments(["--count", "20"]).out)
    assert other.resolve() != benchmark.COMMITTED_RESULTS.resolve() and other.name == "quality_count20_steps20_cfg3"


def test_non_default_settings_cannot_be_written_over_the_committed_results(benchmark, with_matplotlib, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_arguments(["--steps", "4", "--out", str(benchmark.COMMITTED_RESULTS)])
    assert "--out" in capsys.readouterr().err


def test_a_missing_matplotlib_stops_the_run_at_its_start(benchmark, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None)
    with pytest.raises(SystemExit):
        benchmark.parse_arguments([])
    assert "matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, named", [(["--count", "0"], "--count"), (["--offset", "-1"], "--offset"),
                                              (["--ridges", "0"], "--ridges"), (["--fractions", "0"], "--fractions"),
                                              (["--windows", "0.5:0.5"], "--windows"),
                                              (["--windows", "half"], "--windows"),
                                              (["--schedules", "step:1"], "--schedules"),
                                              (["--schedules", "sigma"], "--schedules"),
                                              (["--probes", "3,x"], "--probes"), (["--probes", "-1"], "--probes"),
                                              (["--reproject", "0"], "--reproject")])
def test_the_region_confinement_benchmark_refuses_bad_arguments_naming_them(region_benchmark, capsys, arguments, named):
    with pytest.raises(SystemExit):
        region_benchmark.parse_arguments(arguments)
    assert named in capsys.readouterr().err


def test_region_confinement_runs_split_by_offset_merge_into_the_whole_runs_summary(region_benchmark):
    settings = {"data_seed": 2, "steps": 20, "cfg": 3.0, "edit_strength": 0.5, "unconfined_shift": 10.0, "windows": {}}

    def output(sources, leakages, shift_ratio, converged):
        method = {"leakage": sum(leakages) / len(leakages), "shift_ratio": shift_ratio, "converged": converged}
        return {**settings, "sources": sources, "methods": {"ratio": method}, "seconds": 1.0,
                "per_source_leakage": {"ratio": leakages}}
    # 1 source then 3: the means weigh each run by its sources, not each run alike.
    whole = region_benchmark.merged([output([1, 4], [0.1, 0.2, 0.3], 2.0, 3), output([0, 1], [0.5], 1.0, 0)])
    assert whole["sources"] == [0, 4] and whole["per_source_leakage"]["ratio"] == [0.5, 0.1, 0.2, 0.3]
    assert whole["methods"]["ratio"] == {"leakage": 0.275, "median_leakage": 0.25, "sources_at_most_0.15": 1,
                                         "shift_ratio": 1.75, "converged": 3}
    with pytest.raises(SystemExit, match="not consecutive"):
        region_benchmark.merged([output([0, 1], [0.5], 1.0, 1), output([2, 3], [0.5], 1.0, 1)])
