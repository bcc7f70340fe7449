import json
from pathlib import Path

import pytest

from yoloslim.slim import Pipeline, SlimConfig, slim


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_slim_resumes_after_an_interrupted_stage(shipped_weights, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative project, as the CLI's default runs/slim
    config = SlimConfig(
        weights=str(shipped_weights),
        data=str(tiny_data),
        epochs=3,
        sparse_share=0.5,
        imgsz=64,
        ratio=0.3,
        threads=1,
        project=".",
        name="run",
    )
    real_finetune = Pipeline.stage_finetune

    def dies(self):
        raise Interrupt

    monkeypatch.setattr(Pipeline, "stage_finetune", dies)
    with pytest.raises(Interrupt):
        slim(config)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert set(state["stages"]) == {"profile", "sparse", "prune"} and state["stages"]["sparse"]["skipped"] is False
    assert state["stages"]["profile"] == {"table": None}  # no latency target: nothing profiled
    pruned = tmp_path / "run" / "pruned.pt"
    stamp = pruned.stat().st_mtime_ns

    monkeypatch.setattr(Pipeline, "stage_finetune", real_finetune)
    report = slim(config)
    assert pruned.stat().st_mtime_ns == stamp  # finished stages are not redone
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert list(state["stages"]) == ["profile", "sparse", "prune", "finetune", "export", "evaluate", "bench", "report"]
    # the budget of 3 epochs: sparsity may take half (1), the finetune gets what it left
    assert state["stages"]["sparse"]["epochs"] == 1 and state["stages"]["finetune"]["epochs"] == 2
    html = report.read_text()
    assert "not measured" in html and "finetuned INT8 Q/DQ" in html and "data:image/png;base64" in html
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gamma_history"]["epochs"] and summary["prune"]["widths"]
    assert summary["environment"]["threads"] == 1 and "more_threads" not in summary["environment"]  # threads=1: once
    measured = [v for v in summary["variants"] if v["weights"]]
    assert all(v["eval"] is not None and v["bench"] is not None for v in measured)
    by_name = {v["name"]: v for v in measured}
    cpu_int8 = by_name["finetuned INT8 Q/DQ, CPU placement"]  # what a CPU box runs, beside the TensorRT placement
    assert cpu_int8["eval"]["paired"]["against"] == "base ONNX" and cpu_int8["bench"]["model"]["p50_ms"] > 0
    paired = by_name["finetuned ONNX"]["eval"]["paired"]
    change, low, high = paired["map"]
    assert paired["against"] == "base ONNX" and low <= high
    assert change == pytest.approx(by_name["finetuned ONNX"]["eval"]["map"] - by_name["base ONNX"]["eval"]["map"])


def test_sparsity_trained_input_skips_that_stage(shipped_weights, tiny_data, tmp_path):
    import torch

    ckpt = torch.load(shipped_weights, weights_only=False)
    model = ckpt["ema"] or ckpt["model"]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight[: len(m.weight) // 2] = 0.0  # half the channels dead, as after sparsity training
    sparse = tmp_path / "sparse.pt"
    torch.save({**ckpt, "ema": None, "model": model}, sparse)
    pipeline = Pipeline(SlimConfig(weights=str(sparse), data=str(tiny_data), imgsz=64, project=str(tmp_path), name="s"))
    assert pipeline.stage_sparse() == {"weights": str(sparse), "skipped": True, "epochs": 0}


def test_method_l1_prunes_the_input_without_sparsity_training(shipped_weights, tiny_data, tmp_path):
    from yoloslim.config import PruneConfig
    from yoloslim.prune import prune

    settings = dict(weights=str(shipped_weights), data=str(tiny_data), imgsz=64, project=str(tmp_path))
    assert Pipeline(SlimConfig(**settings, name="default")).config.method == "bn"  # the default trains sparsity
    pipeline = Pipeline(SlimConfig(**settings, method="l1", name="l1"))
    pipeline.finish("profile", {"table": None})
    pipeline.finish("sparse", pipeline.stage_sparse())
    assert pipeline.done("sparse") == {"weights": str(shipped_weights), "skipped": True, "epochs": 0}
    widths = {m: prune(shipped_weights, PruneConfig(method=m, imgsz=64), dry_run=True).widths for m in ("bn", "l1")}
    assert widths["bn"] != widths["l1"]
    assert pipeline.stage_prune()["widths"] == widths["l1"]


def test_the_shipped_sparse_model_counts_as_sparsity_trained_and_the_baseline_does_not(
    shipped_weights, shipped_sparse_weights
):
    from yoloslim.slim import looks_sparsity_trained
    from yoloslim.utils.checks import load_detection_checkpoint

    for weights, sparse in ((shipped_weights, False), (shipped_sparse_weights, True)):
        model, ckpt = load_detection_checkpoint(weights)
        assert looks_sparsity_trained(ckpt, model) is sparse
        assert looks_sparsity_trained({}, model) is sparse  # by its gammas alone, without yoloslim's record


def test_a_run_resumes_only_with_its_own_settings(tiny_data, tmp_path):
    from yoloslim.utils.errors import YoloslimError

    first = Pipeline(SlimConfig(data=str(tiny_data), project=str(tmp_path), name="s"))
    first.finish("sparse", {"weights": "sparse.pt", "skipped": True})
    assert Pipeline(SlimConfig(data=str(tiny_data), project=str(tmp_path), name="s")).done("sparse")
    with pytest.raises(YoloslimError, match=r"other settings \(precision int8 -> fp16\); repeat its settings"):
        Pipeline(SlimConfig(data=str(tiny_data), precision="fp16", project=str(tmp_path), name="s"))


def test_a_bad_prune_amount_is_refused_before_any_training():
    from yoloslim.utils.errors import YoloslimError

    with pytest.raises(YoloslimError, match="target_flops"):
        SlimConfig(target_flops=0)
    with pytest.raises(YoloslimError, match="only one of ratio"):
        SlimConfig(target_flops=0.5, ratio=0.3)
    with pytest.raises(YoloslimError, match="unknown pruning criterion 'gamma'; use bn or l1"):
        SlimConfig(method="gamma")
    assert SlimConfig().prune_config(320).target_flops == 0.5
    assert SlimConfig(ratio=0.3).prune_config(320).target_flops is None


def test_sr_reaches_sparsity_training_and_a_bad_one_is_refused(shipped_weights, tiny_data, tmp_path):
    from yoloslim.config import TARGETED_SR
    from yoloslim.utils.errors import YoloslimError

    with pytest.raises(YoloslimError, match="sr must be a finite number"):
        SlimConfig(sr=-1)
    with pytest.raises(YoloslimError, match="method l1 skips; drop sr"):
        SlimConfig(method="l1", sr=1)
    for sr, used in ((None, TARGETED_SR), (2.0, 2.0)):
        config = SlimConfig(
            weights=str(shipped_weights), data=str(tiny_data), sr=sr, project=str(tmp_path), name=str(sr)
        )
        pipeline = Pipeline(config)
        pipeline.finish("profile", pipeline.stage_profile())
        assert pipeline.sparsity_config().sr == used


# -- the bench stage ---------------------------------------------------------------------------------------------------


@pytest.fixture
def backend_loads(monkeypatch):
    """Each model the bench loads, as (file name, threads), in order; bench times 2 rounds of 1 call (the real timing,
    shorter)."""
    import yoloslim.bench
    import yoloslim.runtime.backends

    loads, real_bench, real_load = [], yoloslim.bench.bench, yoloslim.runtime.backends.load_backend

    def load(weights, threads=None):
        loads.append((Path(weights).name, threads))
        return real_load(weights, threads=threads)

    monkeypatch.setattr(yoloslim.runtime.backends, "load_backend", load)
    monkeypatch.setattr(yoloslim.bench, "bench", lambda *a, **k: real_bench(*a, **{**k, "rounds": 2, "per_round": 1}))
    return loads


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory, shipped_weights, shipped_sparse_weights) -> dict:
    """The shipped base and sparse models in ONNX at 64 px. ONNX Runtime's threads do not spin, so a second thread
    stays cheap on a machine whose cores other processes keep busy (torch's threads wait there for seconds a call)."""
    from yoloslim.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    weights = {"base": shipped_weights, "sparse": shipped_sparse_weights}
    return {name: export_onnx(w, imgsz=64, out=folder / f"{name}.onnx") for name, w in weights.items()}


@pytest.mark.parametrize("threads, cores, counts", [(None, 4, [1, 4]), (3, 2, [1, 3]), (1, 4, [1]), (None, 1, [1])])
def test_bench_times_one_thread_then_all_cores_or_the_threads_given(threads, cores, counts, monkeypatch):
    from yoloslim.bench import bench_thread_counts

    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert bench_thread_counts(threads) == counts


@pytest.mark.parametrize("threads, counts", [(2, [1, 2]), (1, [1])])
def test_the_bench_stage_times_at_one_thread_then_at_the_runs_threads(
    threads, counts, backend_loads, onnx_models, shipped_weights, tiny_data, tmp_path, monkeypatch
):
    from yoloslim.slim import _variant

    config = SlimConfig(
        weights=str(shipped_weights), data=str(tiny_data), imgsz=64, threads=threads, project=str(tmp_path), name="r"
    )
    pipeline = Pipeline(config)
    models = onnx_models
    variants = [_variant(name, name, "ONNX Runtime", "fp32", str(weights)) for name, weights in models.items()]
    monkeypatch.setattr(Pipeline, "variants", lambda self: variants)
    result = pipeline.stage_bench()
    # one pass per thread count, 1 thread first, each loading every model at its count
    assert backend_loads == [(weights.name, n) for n in counts for weights in models.values()]
    assert [result["environment"]["threads"], *result["environment"].get("more_threads", [])] == counts
    for name in models:
        timed = result["results"][name]
        assert timed["model"]["p50_ms"] > 0 and timed["end_to_end"]["runs"] == 2 and timed["fps_end_to_end"] > 0
        assert sorted(timed.get("model_at", {})) == [str(n) for n in counts[1:]]  # the model alone at N threads
        assert all(m["p50_ms"] > 0 and m["runs"] == 2 for m in timed.get("model_at", {}).values())


# -- slim to a latency target ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latency(tmp_path_factory, shipped_weights):
    """A timer whose latency is a known function of the plan, for the shipped baseline at 64 px, and its table."""
    from types import SimpleNamespace

    import numpy as np
    import onnx

    from yoloslim.export.onnx import export_onnx
    from yoloslim.profile import ProfileConfig, profile
    from yoloslim.profile.groups import read_groups
    from yoloslim.profile.predictor import Features

    folder = tmp_path_factory.mktemp("latency")
    features = Features.of_graph(
        read_groups(onnx.load(str(export_onnx(shipped_weights, imgsz=64, out=folder / "m.onnx"))))
    )
    truth = np.concatenate([[0.15], np.linspace(0.02, 0.1, len(features.names))])
    truth[1:] *= 0.85 / (features(features.sizes)[1:] @ truth[1:])

    def measure(widths, rounds):
        ratio = float(features(widths) @ truth)
        return 20 * ratio, 20.0, ratio

    table = folder / "table.json"
    profile(shipped_weights, ProfileConfig(threads=1, imgsz=64), out=table, measure=measure, log=lambda s: None)
    return SimpleNamespace(measure=measure, table=table)


def latency_config(tmp_path, weights, data, **settings) -> SlimConfig:
    return SlimConfig(
        weights=str(weights), data=str(data), imgsz=64, threads=1, project=str(tmp_path), name="run", **settings
    )


def test_a_latency_target_lowers_sparsity_trainings_gflops_stop(latency, shipped_weights, tiny_data, tmp_path):
    stops = []
    for target in (0.9, 0.65):
        config = latency_config(
            tmp_path / str(target), shipped_weights, tiny_data, target_latency=target, latency_table=str(latency.table)
        )
        pipeline = Pipeline(config)
        profiled = pipeline.finish("profile", pipeline.stage_profile())
        assert profiled == {"table": str(pipeline.run / "latency.json"), "profiled": False}
        stops.append(pipeline.sparsity_stop())
    assert 0 < stops[1] < stops[0] < 1


@pytest.mark.parametrize("settings", [{}, {"round_to": 16}, {"target_latency": 0.8}])
def test_sparsity_training_assumes_the_prunes_rounding(settings, latency, shipped_weights, tiny_data, tmp_path):
    """The default, a given multiple, or the latency table's best: the prune and sparsity training's stop and
    targeted plan round alike."""
    import json

    from yoloslim.config import DEFAULT_ROUND_TO

    table = {}
    if "target_latency" in settings:  # a table that learnt 32, so its rounding differs from the default
        learnt = json.loads(latency.table.read_text())
        (tmp_path / "table.json").write_text(json.dumps({**learnt, "round_to": 32}))
        table = {"latency_table": str(tmp_path / "table.json")}
    pipeline = Pipeline(latency_config(tmp_path, shipped_weights, tiny_data, **settings, **table))
    pipeline.finish("profile", pipeline.stage_profile())
    want = settings.get("round_to") or (32 if table else DEFAULT_ROUND_TO)
    assert pipeline.prune_rounding() == want


def test_slim_profiles_this_machine_into_the_run_when_no_table_is_given(
    latency, shipped_weights, tiny_data, tmp_path, monkeypatch
):
    from yoloslim import profile as profiling
    from yoloslim.utils.errors import YoloslimError

    real = profiling.profile
    calls = []

    def timed_by_the_synthetic_timer(weights, config, out, log):
        calls.append((weights, config.threads, config.imgsz, out))
        return real(weights, config, out=out, measure=latency.measure, log=log)

    monkeypatch.setattr(profiling, "profile", timed_by_the_synthetic_timer)
    pipeline = Pipeline(latency_config(tmp_path, shipped_weights, tiny_data, target_latency=0.6))
    table = pipeline.run / "latency.json"
    assert pipeline.stage_profile() == {"table": str(table), "profiled": True}
    assert calls == [(shipped_weights, 1, 64, table)]

    far = Pipeline(latency_config(tmp_path / "far", shipped_weights, tiny_data, target_fps=1e6))
    with pytest.raises(YoloslimError, match=r"target_fps 1e\+06 cannot be reached.*table is kept in .*latency\.json"):
        far.stage_profile()
    assert (far.run / "latency.json").is_file()


@pytest.mark.parametrize(
    "argv,words",
    [
        (("--target-flops", "0.5", "--target-latency", "0.5"), ("only one of", "target_flops and target_latency")),
        (("--target-fps", "1000000"), ("target_fps 1e+06 cannot be reached", "fastest reachable model")),
        (("--target-latency", "0.5", "--imgsz", "96"), ("profiled at imgsz 64", "this run is at 96")),
    ],
)
def test_bad_latency_input_is_one_line_and_writes_nothing(cli, latency, shipped_weights, tmp_path, argv, words):
    from test_cli import assert_one_line_error

    common = ("--weights", shipped_weights, "--latency-table", latency.table, "--project", tmp_path / "runs")
    args = [*argv] if "--imgsz" in argv else [*argv, "--imgsz", "64"]
    assert_one_line_error(cli("slim", *common, *args), "yoloslim slim: error:", *words)
    assert not (tmp_path / "runs").exists()


def test_a_table_of_another_model_is_refused_before_any_work(cli, shipped_weights, tmp_path):
    from test_cli import assert_one_line_error
    from test_prune import random_model, save_as_ultralytics_would

    from yoloslim.profile import ProfileConfig, profile

    other = save_as_ultralytics_would(random_model(cfg="yolov8n.yaml"), tmp_path / "v8.pt")
    table = tmp_path / "v8.json"
    profile(other, ProfileConfig(threads=1, imgsz=64), out=table, measure=lambda w, r: (1.0, 1.0, 1.0), log=print)
    runs = tmp_path / "runs"
    result = cli(
        "slim",
        "--weights",
        shipped_weights,
        "--target-latency",
        "0.5",
        "--latency-table",
        table,
        "--imgsz",
        "64",
        "--project",
        runs,
    )
    assert_one_line_error(result, "has no group matching", "profile this model")
    assert not runs.exists()


@pytest.mark.slow
def test_slim_to_a_latency_target_reports_target_predicted_and_measured(
    latency, shipped_sparse_weights, tiny_data, tmp_path
):
    config = latency_config(
        tmp_path,
        shipped_sparse_weights,
        tiny_data,
        target_latency=0.6,
        latency_table=str(latency.table),
        epochs=1,
        precision="fp16",
    )
    slim(config)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["stages"]["profile"]["table"] == str(tmp_path / "run" / "latency.json")
    figures = state["stages"]["prune"]["latency"]
    assert figures["target"] == 0.6 and 0.5 <= figures["predicted"] <= 0.6 and figures["measured"] > 0
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "- target: 0.600 of the unpruned latency" in report
    assert f"- predicted: {figures['predicted']:.3f}" in report and f"- measured: {figures['measured']:.3f}" in report
    assert "target: 0.600" in (tmp_path / "run" / "report" / "report.html").read_text()


def test_a_table_whose_predictor_missed_its_check_is_used_with_a_warning(latency, shipped_weights, tiny_data, tmp_path):
    table = json.loads(latency.table.read_text())
    table["check"]["max_error"] = 0.25
    missed = tmp_path / "missed.json"
    missed.write_text(json.dumps(table))
    said = []
    for path in (latency.table, missed):
        config = latency_config(
            tmp_path / path.stem, shipped_weights, tiny_data, target_latency=0.7, latency_table=str(path)
        )
        Pipeline(config, log=said.append).stage_profile()
    warnings = [line for line in said if "warning" in line]  # the good table (synthetic timings) gets none
    assert len(warnings) == 1 and "missed its check plans by up to 25 %" in warnings[0]


# -- inputs refused or recognised before any work ----------------------------------------------------------------------


def test_a_dataset_of_another_number_of_classes_is_refused(shipped_weights, two_class_data, tmp_path):
    from yoloslim.utils.errors import YoloslimError

    with pytest.raises(YoloslimError, match=r"detects 3 classes and .* has 2; pass the dataset it was trained on"):
        Pipeline(SlimConfig(weights=str(shipped_weights), data=str(two_class_data), project=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_settings_that_would_fail_a_later_stage_are_refused_before_the_run_exists(shipped_weights, tiny_data, tmp_path):
    from yoloslim.utils.errors import YoloslimError

    settings = dict(weights=str(shipped_weights), data=str(tiny_data), project=str(tmp_path))
    with pytest.raises(YoloslimError, match="imgsz must be a multiple of 32"):
        Pipeline(SlimConfig(**settings, imgsz=300))
    with pytest.raises(YoloslimError, match="budget of 1 epoch leaves none to finetune"):
        Pipeline(SlimConfig(**settings, epochs=1))
    with pytest.raises(YoloslimError, match="threads must be at least 1"):
        SlimConfig(threads=-1)
    with pytest.raises(YoloslimError, match="target_flops 1 keeps every GFLOP"):
        SlimConfig(target_flops=1.0)
    assert list(tmp_path.iterdir()) == []


def test_a_run_resumes_only_with_the_same_files(shipped_weights, shipped_sparse_weights, tiny_data, tmp_path):
    """A model retrained into the same path must not join the stages that its predecessor went through."""
    import shutil

    from yoloslim.utils.errors import YoloslimError

    weights = Path(shutil.copy(shipped_weights, tmp_path / "best.pt"))
    config = SlimConfig(weights=str(weights), data=str(tiny_data), imgsz=64, project=str(tmp_path), name="s")
    Pipeline(config).finish("profile", {"table": None})
    assert Pipeline(config).done("profile")
    shutil.copy(shipped_sparse_weights, weights)
    with pytest.raises(YoloslimError, match=r"other settings \(the weights file's content\)"):
        Pipeline(config)


def test_a_ratio_prune_stops_sparsity_training_at_its_own_gflops(shipped_weights, tiny_data, tmp_path):
    from yoloslim.config import PruneConfig
    from yoloslim.prune import prune

    settings = dict(weights=str(shipped_weights), data=str(tiny_data), imgsz=64, project=str(tmp_path))
    assert Pipeline(SlimConfig(**settings, name="flops")).sparsity_stop() == 0.5
    pipeline = Pipeline(SlimConfig(**settings, ratio=0.2, name="ratio"))
    pipeline.finish("profile", {"table": None})
    planned = prune(shipped_weights, PruneConfig(ratio=0.2, imgsz=64), dry_run=True)
    assert pipeline.sparsity_stop() == pytest.approx(planned.after["gflops"] / planned.before["gflops"])
    assert pipeline.sparsity_stop() > 0.6


def test_a_finetuned_prune_of_a_sparse_model_is_no_longer_sparsity_trained(shipped_weights):
    """The stages' records travel from checkpoint to checkpoint; sparsity training counts only as the last one (the
    baseline's gammas are dense, so its records alone decide)."""
    from yoloslim.slim import looks_sparsity_trained
    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.metadata import set_checkpoint_metadata, with_stage

    model, _ = load_detection_checkpoint(shipped_weights)
    sparse = {"sparsity": {}}
    finetuned = with_stage(with_stage(sparse, "prune", {}), "finetune", {})
    again = with_stage(finetuned, "sparsity", {})  # a second cycle: its record moves last
    assert list(again) == ["prune", "finetune", "sparsity"]
    for metadata, current in ((sparse, True), (finetuned, False), (again, True)):
        set_checkpoint_metadata(model, metadata)
        assert looks_sparsity_trained({"model": model}, model) is current


def test_the_demo_by_l1_norm_starts_from_the_unsparsified_baseline(tiny_data, tmp_path):
    from yoloslim.utils.assets import BASELINE

    pipeline = Pipeline(SlimConfig(method="l1", data=str(tiny_data), project=str(tmp_path)))
    assert pipeline.input.name == BASELINE and pipeline.input == pipeline.base
