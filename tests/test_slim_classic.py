"""`yoloslim slim` on a checkpoint of the original YOLOv5 repository (anchor-based head): every stage runs, and the
run's checkpoints stay in the original's format."""

import json
import shutil

import onnx
import pytest
import test_classic_train
from test_classic_train import CHECKPOINT, assert_original_format, conv_widths
from test_cli import assert_one_line_error

from yoloslim.models import load_classic_checkpoint
from yoloslim.slim import STAGES, Pipeline, SlimConfig

classic_data = test_classic_train.classic_data  # the generated dataset with the fixture checkpoint's three classes


@pytest.fixture
def classic_weights(tmp_path):
    """A copy of the fixture checkpoint that v7.0's train.py wrote (3 classes, trained at 64 px)."""
    return shutil.copy(CHECKPOINT, tmp_path / "best.pt")


def test_a_classic_checkpoint_is_taken_at_its_own_training_size(classic_weights, classic_data, tmp_path):
    pipeline = Pipeline(SlimConfig(weights=str(classic_weights), data=str(classic_data), project=str(tmp_path)))
    assert pipeline.imgsz == 64  # the size in its train.py options, not the default 640
    assert pipeline.stage_profile() == {"table": None}


def test_a_classic_checkpoint_trains_sparsity_by_default_and_method_l1_prunes_it_as_it_is(
    classic_weights, classic_data, tmp_path
):
    """bn (targeted sparsity training, then the prune) is a classic model's default as any model's; method l1 prunes
    the input, the whole budget going to the finetune, in the original's format."""
    settings = dict(weights=str(classic_weights), data=str(classic_data), ratio=0.5, project=str(tmp_path))
    assert Pipeline(SlimConfig(**settings, name="default")).config.method == "bn"
    said = []
    pipeline = Pipeline(SlimConfig(**settings, method="l1", name="l1"), log=said.append)
    for stage in ("profile", "sparse", "prune"):
        pipeline.finish(stage, getattr(pipeline, f"stage_{stage}")())
    assert pipeline.done("sparse") == {"weights": str(classic_weights), "skipped": True, "epochs": 0}
    assert any("method l1" in line for line in said)
    model, _ = assert_original_format(pipeline.done("prune")["weights"], classic_weights, trained=False)
    assert conv_widths(model) != conv_widths(load_classic_checkpoint(classic_weights)[0])


@pytest.mark.parametrize(
    "argv,words",
    [
        (("--qat",), ("anchor-based head", "does not place Q/DQ", "drop qat")),
        (("--target-latency", "0.5"), ("anchor-based head", "latency table", "target_flops or ratio")),
    ],
)
def test_what_the_anchor_head_does_not_take_is_refused_in_one_line_before_any_work(
    cli, classic_weights, classic_data, argv, words
):
    runs = classic_weights.parent / "runs"
    result = cli("slim", "--weights", classic_weights, "--data", classic_data, *argv, "--project", runs)
    assert_one_line_error(result, "yoloslim slim: error:", *words)
    assert not runs.exists()


@pytest.mark.slow
def test_slim_runs_every_stage_on_a_classic_checkpoint(classic_weights, classic_data, tmp_path):
    """Two epochs (one of sparsity training, one of finetuning) at the checkpoint's 64 px: each stage's output, the
    checkpoints in the input's format at the pruned widths, and every variant evaluated and timed in the report."""
    said = []
    config = SlimConfig(
        weights=str(classic_weights),
        data=str(classic_data),
        epochs=2,
        sparse_share=0.5,
        target_flops=0.95,  # the narrow fixture's reach at slim's rounding
        threads=1,
        project=str(tmp_path),
        name="run",
    )
    report = Pipeline(config, log=said.append).run_all()
    run = tmp_path / "run"
    stages = json.loads((run / "state.json").read_text())["stages"]
    assert list(stages) == list(STAGES) and f"slim: {STAGES[-1]}..." in said
    assert stages["sparse"]["skipped"] is False and stages["sparse"]["epochs"] == stages["finetune"]["epochs"] == 1

    widths = conv_widths(load_classic_checkpoint(classic_weights)[0])
    for stage in ("sparse", "prune", "finetune"):
        model, ckpt = assert_original_format(stages[stage]["weights"], classic_weights)
        assert model.model[-1].m[0].out_channels == 3 * (5 + 3)  # the anchor head, three anchors of 3 classes
        pruned = conv_widths(model) != widths
        assert pruned is (stage != "sparse"), stage
    finetuned = load_classic_checkpoint(stages["finetune"]["weights"])[0]
    assert conv_widths(finetuned) == conv_widths(load_classic_checkpoint(stages["prune"]["weights"])[0])

    onnx_files = stages["export"]["onnx"]
    assert set(onnx_files) == {"base", "finetuned", "finetuned-fp16", "finetuned-int8", "finetuned-int8-cpu"}
    for name, path in onnx_files.items():
        meta = {p.key: p.value for p in onnx.load(path).metadata_props}
        assert meta["head"] == "anchor", name
        if name.startswith("finetuned-int8"):
            assert meta["int8_target"] == ("cpu" if name.endswith("cpu") else "tensorrt")

    summary = json.loads((run / "summary.json").read_text())
    assert summary["imgsz"] == 64 and summary["gamma_history"]["epochs"] and summary["prune"]["widths"]
    measured = {v["name"]: v for v in summary["variants"] if v["weights"]}
    assert set(measured) == {
        "base",
        "sparse",
        "pruned",
        "finetuned",
        "base ONNX",
        "finetuned ONNX",
        "finetuned FP16 ONNX",
        "finetuned INT8 Q/DQ, TensorRT placement",
        "finetuned INT8 Q/DQ, CPU placement",
    }
    assert all(v["eval"] is not None and v["bench"]["model"]["p50_ms"] > 0 for v in measured.values())
    assert measured["finetuned"]["bench"]["gflops"] < measured["base"]["bench"]["gflops"]
    assert report.is_file() and "finetuned INT8 Q/DQ, CPU placement" in report.read_text()


def test_the_classic_runs_report_reads_the_sparsity_record_from_the_originals_format(tmp_path):
    """The gamma history travels on the model of a file in the original's format, which Ultralytics cannot load."""
    from yoloslim.models.save import original_names, save_original_format
    from yoloslim.utils.training import read_checkpoint_extras

    model, ckpt = load_classic_checkpoint(CHECKPOINT)
    out = tmp_path / "sparse.pt"
    save_original_format(model, ckpt, out, original_names(CHECKPOINT), {"gamma_history": {"epochs": [1]}})
    assert read_checkpoint_extras(out) == {"gamma_history": {"epochs": [1]}}
