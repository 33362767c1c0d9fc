"""``scripts/bench_quality.py``'s ``--hetero``, ``--thin`` and ``--preset medium``: what they
set, the input they refuse, ``--device``, the thin link's rate and the printed link labels. The runs themselves are
in docs/benchmarks/hetero.md and thin.md (minutes each, too long for the suite)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_quality
import quality_args
from quality_report import link_label


def test_hetero_sets_the_mix_and_times_it_over_its_own_links():
    args = bench_quality.parse_args(["--hetero"])
    assert args.slowdowns == [1.0, 1.0, 2.0, 4.0]
    assert args.shaped == ["hetero"]
    assert bench_quality.shaped_links(args, "hetero") == [
        (100e6, 0.0), (10e6, 0.05), (10e6, 0.05), (2e6, 0.05)
    ]  # fmt: skip
    assert (args.H, args.codecs, args.every_s) == ([50], ["int8"], [2.5])
    # given flags win over the preset's defaults
    args = bench_quality.parse_args(["--hetero", "--H", "100", "--every-s", "1", "2"])
    assert (args.H, args.every_s) == ([100], [1.0, 2.0])
    assert bench_quality.shaped_links(bench_quality.parse_args([]), "10") == [(10e6, 0.05)] * 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hetero", "--world", "3"], "the mix is for 4 workers, not --world 3"),
        (["--hetero", "--thin"], "give one"),
        (["--thin", "--codecs", "int8"], "leave out --H, --codecs and --every-s"),
        (["--hetero", "--no-netns"], "drop --no-netns"),
        (["--preset", "medium", "--quick"], "not with --quick, --hetero or --thin"),
        (["--preset", "medium", "--thin"], "not with --quick, --hetero or --thin"),
        (["--preset", "large"], "invalid choice: 'large'"),
        (["--device", "gpu7"], "--device: device: 'gpu7' is not a torch device"),
    ],
)
def test_presets_refuse_what_they_cannot_honour(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_quality.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_thin_rate_makes_a_dense_push_four_rounds_long():
    # 120,576 fp32 parameters, 20 ms a step: a round of 50 steps is 1 s, the push 4 s
    rate = bench_quality.thin_rate_bps(482_304, 0.020)
    assert rate == pytest.approx(482_304 * 8 / 4.0)
    assert 482_304 * 8 / rate == pytest.approx(4 * 50 * 0.020)
    args = bench_quality.parse_args(["--thin"])
    assert (args.H, args.codecs, args.baseline_H, args.shaped) == ([50], [], 50, ["thin"])


def test_link_labels():
    assert link_label(quality_args.HETERO_LINKS) == "100/10/10/2 Mbit/s, 0/50/50/50 ms"
    assert link_label([(964_608.0, 0.05)] * 4) == "0.965 Mbit/s, 50 ms"
    assert link_label([{"rate_bps": 100e6, "delay_s": 0.0}] * 4) == "100 Mbit/s"


def test_outer_steps_side_by_side():
    args = bench_quality.parse_args(["--hetero"])
    assert args.arch_outer == [("nesterov", {"lr": 0.7, "momentum": 0.9})]
    argv = ["--hetero", "--arch-outer", "nesterov:lr=0.7,momentum=0.9",
            "delayed_nesterov:lr=0.7,momentum=0.9,delay=4,buffer_k=1"]  # fmt: skip
    plain, delayed = bench_quality.parse_args(argv).arch_outer
    assert bench_quality.outer_label(plain) == "nesterov"
    assert bench_quality.outer_label(delayed) == "delayed_nesterov_d4_k1"
    # two entries with the same short label each get every parameter, so their slots differ
    a, b = bench_quality.parse_args(["--arch-outer", "nesterov:lr=0.7,momentum=0.8",
                                     "nesterov:lr=0.5,momentum=0.9"]).arch_outer  # fmt: skip
    assert [bench_quality.outer_label(o, [a, b]) for o in (a, b)] == [
        "nesterov_lr0.7_momentum0.8", "nesterov_lr0.5_momentum0.9"]  # fmt: skip
    assert bench_quality.outer_label(plain, [plain, delayed]) == "nesterov"
    # buffer_k is the root's, not the optimizer's
    assert bench_quality.split_outer(delayed) == (
        ("delayed_nesterov", {"lr": 0.7, "momentum": 0.9, "delay": 4.0}), 1
    )  # fmt: skip
    assert bench_quality.split_outer(plain)[1] is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("delayed_nesterov:delay=0", "delay must be a whole number"),
        ("nesterov:buffer_k=0.5", "buffer_k must be a whole number"),
        ("adam:lr=1", "unknown outer optimizer"),
        ("nesterov:lr=fast", "use NAME:key=number"),
    ],
)
def test_bad_outer_steps_are_refused_before_any_run(value, message, capsys):
    with pytest.raises(SystemExit):
        bench_quality.parse_args(["--arch-outer", value])
    assert message in capsys.readouterr().err


def test_error_feedback_decays_side_by_side():
    assert bench_quality.parse_args([]).ef_decay == [None]  # the island's default
    assert bench_quality.parse_args(["--ef-decay", "1", "0.95"]).ef_decay == [1.0, 0.95]
    args = bench_quality.parse_args(["--publish-ef-decay", "0.9", "1"])
    assert (args.publish_ef_decay, args.ef_decay) == ([0.9, 1.0], [None])


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "most"])
def test_a_bad_error_feedback_decay_is_refused_before_any_run(value, capsys):
    with pytest.raises(SystemExit):
        bench_quality.parse_args(["--ef-decay", value])
    assert "(0, 1]" in capsys.readouterr().err


def test_inner_learning_rates():
    args = bench_quality.parse_args([])
    assert (args.lr, args.arch_lr, args.baseline_lr) == (2e-3, [None], None)  # one rate
    args = bench_quality.parse_args(["--lr", "4e-3", "--arch-lr", "4e-3", "8e-3",
                                     "--baseline-lr", "6e-3"])  # fmt: skip
    assert (args.lr, args.arch_lr, args.baseline_lr) == (4e-3, [4e-3, 8e-3], 6e-3)
    # slots are named by the rate only when several run side by side; the default has a label too
    assert [bench_quality.lr_label(x) for x in (None, 4e-3)] == ["lr_default", "lr0.004"]
    assert [bench_quality.ef_label(x) for x in (None, 0.95)] == ["ef_default", "ef0.95"]


@pytest.mark.parametrize("flag", ["--lr", "--arch-lr", "--baseline-lr"])
@pytest.mark.parametrize("value", ["0", "-1e-3", "nan", "fast"])
def test_a_bad_learning_rate_is_refused_before_any_run(flag, value, capsys):
    with pytest.raises(SystemExit):
        bench_quality.parse_args([f"{flag}={value}"])
    assert "positive" in capsys.readouterr().err


def test_fragments_rows_per_setting():
    args = bench_quality.parse_args(["--quick", "--fragments", "1", "2", "2"])
    assert args.fragments == [1, 2]  # each count once
    assert bench_quality.parse_args(["--quick"]).fragments == [1]
    # --thin: int4 at H = 50 whole and in 2 and 4 fragments, sparse2 whole; --fragments sets
    # the int4 setting's counts
    args = bench_quality.parse_args(["--thin"])
    assert args.thin_fragments == {"int4_H50": [1, 2, 4], "sparse2_H10_sgd": [1]}
    assert args.fragments == [1]
    args = bench_quality.parse_args(["--thin", "--fragments", "1", "8"])
    assert args.thin_fragments == {"int4_H50": [1, 8], "sparse2_H10_sgd": [1]}
    assert (bench_quality.fragment_suffix(1), bench_quality.fragment_suffix(4)) == ("", "_F4")
    assert bench_quality.fragment_setting(1) == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fragments", "0"], "counts of at least 1"),
        (["--quick", "--fragments", "11"], "the shortest H is 10"),
        (["--thin", "--fragments", "51"], "the shortest H is 50"),
        (["--quick", "--fragments", "2", "--h-warmup", "5:20"], "not with --h-warmup"),
    ],
)
def test_fragments_refused_where_they_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_quality.parse_args(argv)
    assert message in capsys.readouterr().err


def test_planned_push_of_the_thin_model_in_fragments(capsys):
    # the thin run's model (d_model 64, 2 layers): 28 tensors, 120,576 parameters; its int4
    # push falls from 69 KB to 38 KB in 2 fragments and 20 KB in 4 (the largest fragment's)
    sizes = bench_quality.param_sizes(
        {"d_model": 64, "n_layer": 2, "n_head": 4, "context": 64, "batch_size": 16}
    )
    assert (len(sizes), sum(sizes.values())) == (28, 120_576)
    whole, two, four = (bench_quality.planned_push_bytes(sizes, "int4", f) for f in (1, 2, 4))
    assert (whole, two, four) == (68_848, 38_500, 19_888)
    # the quick model has 16 tensors: 17 fragments are refused before any run
    args = bench_quality.parse_args(["--quick", "--H", "20", "--fragments", "17"])
    with pytest.raises(SystemExit) as exit_info:
        bench_quality.check_fragment_counts(bench_quality.param_sizes(args.workload), args)
    assert exit_info.value.code == 2
    assert "--fragments 17" in capsys.readouterr().err


def test_the_medium_preset_runs_the_workloads_default_model():
    from island.workloads.bytelm import ByteLMConfig

    args = bench_quality.parse_args(["--preset", "medium"])
    default = ByteLMConfig()
    for key in ("d_model", "n_layer", "n_head", "context"):
        assert args.workload[key] == getattr(default, key), key
    assert args.workload["device"] == "cpu"
    assert (args.steps, args.max_factor, args.H, args.baseline_H) == (2000, 2.0, [50], 50)
    assert args.codecs == ["int8", "int4"] and args.skip == ["hivemind"]
    assert args.no_netns and args.shaped == []
    # flags given by hand win; --skip alone keeps every method; --shaped times links again
    args = bench_quality.parse_args(["--preset", "medium", "--steps", "2500", "--H", "100",
                                     "--skip", "--shaped", "10", "--d-model", "96"])  # fmt: skip
    assert (args.steps, args.H, args.skip, args.shaped) == (2500, [100], [], ["10"])
    assert args.workload["d_model"] == 96 and not args.no_netns
    # without the preset nothing changes
    args = bench_quality.parse_args([])
    assert (args.steps, args.H, args.skip) == (3000, [50, 100, 250, 500], [])


def test_a_cuda_device_on_a_machine_without_one_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        assert bench_quality.parse_args(["--device", "cuda"]).workload["device"] == "cuda"
        return
    with pytest.raises(SystemExit) as exit_info:
        bench_quality.parse_args(["--preset", "medium", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_hivemind_gives_a_part_time_to_cross_the_thinnest_hetero_link():
    """A sender whose next chunk takes longer than ``next_chunk_timeout`` is dropped from the
    all-reduce, and after such a partial round hivemind's parameters went NaN (hetero.md). The
    thinnest peer streams to the other three at once, so a part of hivemind's largest size
    shares its link three ways; the timeout must outlast that."""
    from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES

    settings = quality_args.HIVEMIND_STANDARD
    thinnest = min(rate for rate, _ in quality_args.HETERO_LINKS)
    world = len(quality_args.HETERO_LINKS)
    shared_part_s = (world - 1) * DEFAULT_PART_SIZE_BYTES * 8 / thinnest
    # hivemind's default is matchmaking_time, which is short for another reason (quality_args)
    timeout = settings.get("next_chunk_timeout", settings["matchmaking_time"])
    assert timeout > shared_part_s
    assert settings["averaging_timeout"] >= timeout


def test_a_hivemind_workers_wait_for_peers_is_not_counted_as_compute(tmp_path):
    """hivemind's optimizer step holds the all-reduce at an epoch's end, inside the timed
    step: the busy seconds (utilization) count each optimizer step at most its median."""
    import json

    from quality_methods import Recorder

    rec = Recorder({"rank": 0, "run_dir": str(tmp_path), "world": 1}, None, None)
    rec.busy_s = 10.0
    rec.optimizer_s = [0.01, 0.01, 0.012, 5.0, 0.011]
    assert rec.optimizer_wait_s() == 0.0  # an optimizer that never waits: counted whole
    rec.optimizer_waits = True
    assert rec.optimizer_wait_s() == pytest.approx((5.0 - 0.011) + (0.012 - 0.011))  # median 0.011
    rec.write(5)
    result = json.loads((tmp_path / "result-0.json").read_text())
    assert result["busy_s"] == pytest.approx(10.0 - 4.99)
    assert result["optimizer_wait_s"] == pytest.approx(4.99)


def test_steps_in_a_version_count_every_islands_merged_rounds():
    # island a pushed rounds of 5 steps (sequences 1..3), b of 10 (1..2); version 1 merged
    # a's first round and b's first, version 2 a's second, version 3 a's third, b's second
    # and an update no island recorded
    merged = {1: [("a", 1), ("b", 1)], 2: [("a", 2)], 3: [("a", 3), ("b", 2), ("c", 9)]}
    rounds = {"a": {"1": 5, "2": 5, "3": 5}, "b": {"1": 10, "2": 10}}
    held, missing = bench_quality.held_steps(merged, rounds)
    assert held == {0: {"a": 0, "b": 0}, 1: {"a": 5, "b": 10}, 2: {"a": 10, "b": 10},
                    3: {"a": 15, "b": 20}}  # fmt: skip
    assert missing == 1
    evals = [{"version": 0}, {"version": 2}, {"version": 3}]
    # the mean over the islands, and rank 0's (the first peer's) own
    assert bench_quality.federation_steps(evals, [held], ["a", "b"]) == [(0, 0), (10, 10),
                                                                         (17.5, 15)]  # fmt: skip


def test_steps_in_a_fragmented_model_are_each_islands_fewest_of_any_fragment():
    line0 = {0: {"a": 0, "b": 0}, 1: {"a": 50, "b": 50}, 2: {"a": 100, "b": 50}}
    line1 = {0: {"a": 0, "b": 0}, 1: {"a": 25, "b": 75}}
    # rank 0 evaluated versions (2, 1) of the two lines: a holds min(100, 25), b min(50, 75)
    got = bench_quality.federation_steps([{"versions": [2, 1]}], [line0, line1], ["a", "b"])
    assert got == [(37.5, 25)]
