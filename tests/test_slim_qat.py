"""`yoloslim slim --qat`: the finetune's last epochs quantization-aware for the chosen INT8 flavour, whose export
takes the trained ranges without calibration, and the report names that variant QAT."""

import json
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from test_cli import assert_one_line_error

from yoloslim.export.fakequant import trained_scales
from yoloslim.slim import SlimConfig, slim
from yoloslim.utils.checks import load_detection_checkpoint
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.metadata import checkpoint_metadata


def written_scales(path) -> dict:
    """Scale and zero point of each activation QuantizeLinear of an ONNX, by the tensor it quantizes."""
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return {
        n.input[0]: (float(init[n.input[1]]), int(init[n.input[2]]))
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in init
    }


@pytest.mark.slow
def test_slim_qat_trains_the_last_epoch_quantization_aware_and_exports_its_scales(
    shipped_sparse_weights, tiny_data, tmp_path, monkeypatch
):
    """A budget of 2 on the sparsity-trained demo model: 1 float epoch, then 1 quantization-aware one for the CPU
    flavour from its best.pt; the QAT INT8 export carries the trained scales, uncalibrated, beside both placements'
    post-training INT8 of the float finetune."""
    from yoloslim.export import qdq

    calibrated, quantize_int8 = [], qdq.quantize_int8

    def calibrating(onnx_path, *args, **kwargs):
        calibrated.append((Path(onnx_path).name, kwargs.get("target")))
        return quantize_int8(onnx_path, *args, **kwargs)

    monkeypatch.setattr(qdq, "quantize_int8", calibrating)
    config = SlimConfig(
        weights=str(shipped_sparse_weights),
        data=str(tiny_data),
        epochs=2,
        imgsz=64,
        ratio=0.3,
        threads=1,
        qat=True,
        qat_target="cpu",
        # one batch per epoch: two QAT epochs would accumulate into a single step in the second, and best.pt could be
        # the first, untrained epoch
        qat_epochs=1,
        project=str(tmp_path),
        name="run",
    )
    report = slim(config)
    run = tmp_path / "run"
    stages = json.loads((run / "state.json").read_text())["stages"]
    finetune = stages["finetune"]
    assert stages["sparse"]["epochs"] == 0 and finetune["epochs"] == 1  # the same budget: 1 float + 1 QAT epoch
    assert {k: finetune["qat"][k] for k in ("epochs", "target")} == {"epochs": 1, "target": "cpu"}
    args = yaml.safe_load((run / "qat" / "args.yaml").read_text())
    assert args["model"] == finetune["weights"] and args["epochs"] == 1
    float_model, float_ckpt = load_detection_checkpoint(finetune["weights"])
    model, ckpt = load_detection_checkpoint(finetune["qat"]["weights"])
    assert "qat" not in checkpoint_metadata(float_ckpt) and checkpoint_metadata(ckpt)["qat"]["target"] == "cpu"

    onnx_files = stages["export"]["onnx"]
    assert {"finetuned-int8", "finetuned-int8-cpu", "qat-int8"} <= set(onnx_files)
    scales, written = trained_scales(model), written_scales(onnx_files["qat-int8"])
    assert scales and all(written[t] == s for t, s in scales.items())
    assert calibrated == [("finetuned.onnx", "tensorrt"), ("finetuned.onnx", "cpu")]  # the PTQ controls alone
    trained = dict(model.named_parameters())  # QAT trained the float finetune's weights
    assert any(not torch.equal(p, trained[name]) for name, p in float_model.named_parameters())
    meta = {p.key: p.value for p in onnx.load(onnx_files["qat-int8"]).metadata_props}
    assert (meta["precision"], meta["int8_target"]) == ("int8", "cpu")

    summary = json.loads((run / "summary.json").read_text())
    by_name = {v["name"]: v for v in summary["variants"]}
    qat = by_name["QAT INT8 Q/DQ, CPU placement"]
    assert (qat["stage"], qat["precision"], qat["weights"]) == ("qat", "int8", onnx_files["qat-int8"])
    assert qat["eval"]["paired"]["against"] == "base ONNX" and qat["bench"]["model"]["p50_ms"] > 0
    assert "finetuned INT8 Q/DQ, CPU placement" in by_name and "QAT INT8 Q/DQ, CPU placement" in report.read_text()


@pytest.mark.parametrize(
    "argv,words",
    [
        (("--qat", "--precision", "fp16"), ("qat prepares the INT8 export", "set precision int8")),
        (("--qat-target", "cpu"), ("qat_target cpu", "add qat")),
        (("--qat", "--qat-epochs", "0"), ("qat_epochs must be at least 1",)),
    ],
)
def test_bad_qat_input_is_one_line_and_writes_nothing(cli, tiny_data, tmp_path, argv, words):
    runs = tmp_path / "runs"
    assert_one_line_error(cli("slim", "--data", tiny_data, *argv, "--project", runs), "yoloslim slim: error:", *words)
    assert not runs.exists()


def test_a_budget_without_a_float_epoch_before_qat_is_refused(cli, shipped_weights, tiny_data, tmp_path):
    """The baseline is not sparsity-trained: 1 of a budget of 2 epochs may go to that, leaving none in float."""
    runs = tmp_path / "runs"
    result = cli("slim", "--weights", shipped_weights, "--data", tiny_data, "--epochs", 2, "--qat", "--project", runs)
    assert_one_line_error(result, "yoloslim slim: error:", "a float finetune epoch", "leaves 1 after", "raise epochs")
    assert not runs.exists()


def test_qat_settings_are_checked_by_the_config():
    with pytest.raises(YoloslimError, match="unknown INT8 target 'gpu' for qat_target"):
        SlimConfig(qat=True, qat_target="gpu")
    assert SlimConfig(qat=True, qat_target="cpu").qat_config().target == "cpu"
