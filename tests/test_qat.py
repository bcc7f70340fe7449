"""Quantization-aware finetuning (`yoloslim finetune --qat`) and the INT8 export of its checkpoints: the fake
quantization sits where the exported Q/DQ graph has it, with the same scales, and both find the same detections."""

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from test_cli import assert_one_line_error

from yoloslim.config import QatConfig
from yoloslim.export import ExportConfig, export
from yoloslim.export.fakequant import FakeQuant, QuantConv, is_qat, prepare_qat, strip_qat, trained_scales
from yoloslim.export.qdq import check_tensorrt_qdq
from yoloslim.prune import PruneConfig, prune
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.metadata import checkpoint_metadata, set_checkpoint_metadata

IMGSZ = 160


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, shipped_sparse_weights):
    """The shipped sparse model without the channels its sparsity training zeroed (0.6 of its GFLOPs kept): a pruned
    model that still detects in the generated dataset's images, with offset-carrying convs."""
    out = tmp_path_factory.mktemp("qat") / "pruned.pt"
    prune(shipped_sparse_weights, PruneConfig(threshold=1e-2, imgsz=IMGSZ), out=out)
    return out


def qat_checkpoint(pruned, data, target, path):
    """`pruned` with fake quantization for `target` calibrated on 8 training images, saved as finetuning saves it."""
    from yoloslim.utils.checks import load_detection_checkpoint

    model, ckpt = load_detection_checkpoint(pruned)
    record = prepare_qat(model, target, data, IMGSZ, count=8)
    set_checkpoint_metadata(model, {**checkpoint_metadata(ckpt), "qat": record})
    torch.save({**ckpt, "model": model.half(), "ema": None}, path)
    return path


@pytest.fixture(scope="module", params=["tensorrt", "cpu"])
def exported(request, pruned, synthetic_data, tmp_path_factory):
    """A QAT checkpoint of each flavour and its INT8 export, written without calibration data."""
    work = tmp_path_factory.mktemp(f"qat-{request.param}")
    weights = qat_checkpoint(pruned, synthetic_data, request.param, work / "qat.pt")
    config = ExportConfig(precision="int8", imgsz=IMGSZ, target=request.param)
    return request.param, weights, export(weights, config, out=work / "qat-int8.onnx")


def test_a_qat_export_refuses_calibration_data_it_would_not_use(exported, synthetic_data):
    target, weights, _ = exported
    with pytest.raises(YoloslimError, match="exports with the ranges it trained, not from data; drop --data"):
        export(weights, ExportConfig(precision="int8", imgsz=IMGSZ, target=target), data=synthetic_data)


def conv_widths(weights) -> list[int]:
    """The output widths of a checkpoint's convolutions, in order."""
    from yoloslim.utils.checks import load_detection_checkpoint

    return [m.out_channels for m in load_detection_checkpoint(weights)[0].modules() if isinstance(m, torch.nn.Conv2d)]


def load(weights):
    from yoloslim.utils.checks import load_detection_checkpoint

    model = load_detection_checkpoint(weights)[0].float().eval()
    model.fuse(verbose=False)  # as evaluation and export run it
    return model


def detections(model_or_path, batch) -> np.ndarray:
    """Raw output (images, 4 + classes, anchors) of a PyTorch model or an ONNX file (ONNX Runtime, optimized)."""
    if isinstance(model_or_path, torch.nn.Module):
        with torch.no_grad():
            return model_or_path(torch.from_numpy(batch))[0].numpy()
    session = ort.InferenceSession(str(model_or_path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {session.get_inputs()[0].name: x[None]})[0] for x in batch])


def disagreement(reference, other):
    """Per anchor that `reference` finds confident (score > 0.25): the largest box coordinate and class score
    differences."""
    confident = reference[:, 4:].max(1) > 0.25
    anchors = lambda a: a.transpose(0, 2, 1)[confident]  # noqa: E731
    return np.abs(anchors(reference)[:, :4] - anchors(other)[:, :4]).max(1), np.abs(
        anchors(reference)[:, 4:] - anchors(other)[:, 4:]
    ).max(1)


@pytest.fixture(scope="module")
def val_batch(synthetic_data):
    from yoloslim.evaluate import split_images
    from yoloslim.runtime.preprocess import preprocess

    return preprocess([cv2.imread(str(p)) for p in split_images(synthetic_data, "val")[0]], IMGSZ)[0]


# Share of confident anchors whose box lies within 1 px and whose scores lie within 0.02 of the ONNX model's, at least.
# Not all of them: where PyTorch's and ONNX Runtime's convolutions sum in a different order, a value on a rounding
# boundary lands one level apart, and such flips spread through the later layers. The CPU flavour has more of them: it
# quantizes every SiLU and runs fused integer kernels. Measured on these 24 images: TensorRT flavour 100% and 98%, CPU
# flavour 98% and 63%; the float model (the control) 93% and 41%, 90% and 28%.
AGREEMENT = {"tensorrt": (1.0, 0.95), "cpu": (0.95, 0.5)}
# How much closer to the INT8 model the fake-quantized model must be than the float one. ONNX Runtime's fused CPU
# kernels round in more places than the fake quantization does (their integer accumulators and requantized outputs),
# so the CPU flavour's emulation is the looser one: 1.8x closer on the shipped sparse model's prune, 2x and more for
# the TensorRT placement.
CLOSER = {"tensorrt": 2.0, "cpu": 1.5}


@pytest.mark.slow
def test_fake_quantized_model_and_its_qdq_onnx_agree(exported, val_batch):
    """On real images: confident boxes within 1 px and scores within 0.02 (for the shares of AGREEMENT), and closer
    than the float model with the same weights (by CLOSER)."""
    target, weights, int8 = exported
    reference = detections(int8, val_batch)
    boxes, scores = disagreement(reference, detections(load(weights), val_batch))
    assert boxes.size >= 100
    within_box, within_score = AGREEMENT[target]
    assert np.mean(boxes <= 1.0) >= within_box and np.mean(scores <= 0.02) >= within_score
    float_model = load(weights)
    strip_qat(float_model)
    _, float_scores = disagreement(reference, detections(float_model, val_batch))
    assert np.median(scores) < np.median(float_scores) / CLOSER[target]


@pytest.mark.slow
def test_export_writes_the_trained_scales_where_training_quantized(exported):
    target, weights, int8 = exported
    graph = onnx.load(str(int8))
    init = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    written = {
        n.input[0]: (float(init[n.input[1]]), int(init[n.input[2]]))
        for n in graph.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in init
    }
    scales = trained_scales(load(weights))
    assert scales and all(written[t] == s for t, s in scales.items())
    producer = {o: n.op_type for n in graph.graph.node for o in n.output}
    assert {producer[t] for t in set(written) - set(scales)} <= {"MaxPool", "Resize"}  # on their input's grid
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["int8_target"] == target and meta["precision"] == "int8"
    if target == "tensorrt":
        assert check_tensorrt_qdq(graph) == []


@pytest.mark.slow
def test_export_takes_changed_scales_without_calibration(pruned, synthetic_data, tmp_path):
    """The scales come from the checkpoint, not from data: changed there, they change in the ONNX."""
    from yoloslim.utils.checks import load_detection_checkpoint

    weights = qat_checkpoint(pruned, synthetic_data, "tensorrt", tmp_path / "qat.pt")
    model, ckpt = load_detection_checkpoint(weights)
    quantizer = next(m for m in model.modules() if isinstance(m, FakeQuant) and m.tensor != "images")
    quantizer.scale *= 1.25
    torch.save({**ckpt, "model": model}, tmp_path / "changed.pt")
    graph = onnx.load(str(export(tmp_path / "changed.pt", ExportConfig(precision="int8", imgsz=IMGSZ))))
    init = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    scale = next(
        init[n.input[1]] for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == quantizer.tensor
    )
    assert float(scale) == pytest.approx(float(quantizer.scale), rel=1e-6)


@pytest.mark.slow
def test_head_outputs_and_offset_carrying_convs_train_in_float(shipped_sparse_weights, synthetic_data):
    """As in the export: the head's final convs read float values with float weights, and the shipped sparse model's
    model.6 convs, whose inputs carry small swings on large offsets, stay float while model.2 trains quantized."""
    from yoloslim.utils.checks import load_detection_checkpoint

    model = load_detection_checkpoint(shipped_sparse_weights)[0].float()
    prepare_qat(model, "tensorrt", synthetic_data, IMGSZ, count=8)
    blocks = dict(model.named_modules())
    head = model.model[-1]
    for branch in (*head.cv2, *head.cv3):
        assert type(branch[-1]) is torch.nn.Conv2d and "qat_act" not in branch[-2]._modules
    offset = blocks["model.6.cv1"]
    assert not isinstance(offset, QuantConv) or (offset.weight_levels == 0 and "qat_input" not in offset._modules)
    assert blocks["model.2.cv1"].weight_levels == 127 and "qat_act" in blocks["model.1"]._modules  # its input
    strip_qat(model)
    assert not is_qat(model) and not any(m._forward_hooks for m in model.modules())


def test_mismatched_target_is_refused_in_one_line_and_writes_nothing(shipped_weights, tmp_path, cli):
    """The refusal reads only the checkpoint's record of its flavour, before any export work."""
    from yoloslim.utils.checks import load_detection_checkpoint

    model, ckpt = load_detection_checkpoint(shipped_weights)
    weights = tmp_path / "qat.pt"
    set_checkpoint_metadata(model, {"qat": {"target": "cpu", "imgsz": 64, "placement": {}}})
    torch.save({**ckpt, "model": model}, weights)
    with pytest.raises(YoloslimError, match="for the cpu INT8 flavour, not tensorrt"):
        export(weights, ExportConfig(precision="int8", imgsz=64, target="tensorrt"))
    assert_one_line_error(
        cli("export", "--weights", weights, "--precision", "int8", "--imgsz", 64), "cpu INT8 flavour", "target cpu"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat.pt"]


@pytest.mark.parametrize("command", ["finetune", "export"])
def test_qat_and_int8_of_a_non_detection_checkpoint_is_refused_in_one_line(command, tmp_path, cli, tiny_data):
    from ultralytics import YOLO

    classifier = tmp_path / "cls.pt"
    YOLO("yolov8n-cls.yaml").save(str(classifier))
    flags = ["--qat", "--data", tiny_data] if command == "finetune" else ["--precision", "int8", "--data", tiny_data]
    assert_one_line_error(cli(command, "--weights", classifier, *flags), "classification model", "detection")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls.pt"]


def test_qat_config_refuses_bad_settings():
    with pytest.raises(YoloslimError, match="unknown INT8 target 'arm'"):
        QatConfig(qat=True, target="arm")
    with pytest.raises(YoloslimError, match="at least 1"):
        QatConfig(qat=True, calibration_images=0)
    with pytest.raises(YoloslimError, match="lr_scale must be in"):
        QatConfig(qat=True, lr_scale=0)


def test_a_qat_checkpoint_is_not_made_quantization_aware_twice(shipped_weights, tiny_data):
    from yoloslim.utils.checks import load_detection_checkpoint

    model = load_detection_checkpoint(shipped_weights)[0].float()
    model.model[1].qat_output = FakeQuant("/model.1/Conv_output_0", 0.1, 0, -128, 127)
    with pytest.raises(YoloslimError, match="already quantization-aware"):
        prepare_qat(model, "cpu", tiny_data, 64, count=2)


def batchnorm_statistics(model) -> list[torch.Tensor]:
    return [
        s.detach().clone()
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for s in (m.running_mean, m.running_var)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("freeze_bn", [True, False])
def test_qat_freeze_bn_holds_batchnorm_statistics(freeze_bn, pruned, train_args, tiny_data):
    """The ranges are calibrated with BatchNorm's running statistics: freeze_bn keeps them while gamma and beta still
    learn; without it (the default) the same steps move them, the control. QAT trains at lr_scale times the
    finetune's rate, without warm-up."""
    from functools import partial

    from ultralytics import YOLO

    from yoloslim.finetune import QatTrainer

    seen = {}

    def start(trainer):
        seen["rates"] = [group["initial_lr"] for group in trainer.optimizer.param_groups]
        seen["warmup"] = trainer.args.warmup_epochs
        seen["statistics"] = batchnorm_statistics(trainer.model)
        seen["gammas"] = [
            m.weight.detach().clone() for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)
        ]

    def end(trainer):  # after the epoch's steps, before validation
        seen["moved"] = not all(
            torch.equal(a, b) for a, b in zip(seen["statistics"], batchnorm_statistics(trainer.model), strict=True)
        )
        gammas = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        seen["learnt"] = not all(torch.equal(a, b) for a, b in zip(seen["gammas"], gammas, strict=True))

    model = YOLO(str(pruned))
    model.add_callback("on_train_start", start)
    model.add_callback("on_train_epoch_end", end)
    args = {k: v for k, v in train_args.items() if k not in {"model", "data", "warmup_epochs"}}
    args |= {"epochs": 2, "optimizer": "SGD", "lr0": 0.01}
    qat = QatConfig(qat=True, target="cpu", calibration_images=4, freeze_bn=freeze_bn, lr_scale=0.5)
    model.train(data=str(tiny_data), trainer=partial(QatTrainer, qat=qat), **args)
    assert seen["learnt"] and seen["moved"] is not freeze_bn
    assert seen["rates"] == pytest.approx([0.005] * len(seen["rates"])) and seen["warmup"] == 0
    assert model.trainer.args.lr0 == pytest.approx(0.005)  # what a resumed run rebuilds its optimizer with


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_qat_finetuning_keeps_widths_and_quantization_after_resume(pruned, train_args, tiny_data, tmp_path):
    """Through yoloslim's trainer: the pruned widths, the fake quantization and its record survive an interrupted
    run and its resume, and the result exports without calibration data."""
    from functools import partial

    from ultralytics import YOLO

    from yoloslim.finetune import QatTrainer, finetune
    from yoloslim.utils.checks import load_detection_checkpoint

    def stop(trainer):
        raise Interrupt

    model = YOLO(str(pruned))
    model.add_callback("on_model_save", stop)
    args = {k: v for k, v in train_args.items() if k not in {"model", "data"}}
    with pytest.raises(Interrupt):
        qat = QatConfig(qat=True, target="cpu", calibration_images=4)
        model.train(data=str(tiny_data), trainer=partial(QatTrainer, qat=qat), **args)
    last = model.trainer.last
    assert conv_widths(last) == conv_widths(pruned)
    finetune(last, resume=True)
    best = last.with_name("best.pt")
    quantized = load_detection_checkpoint(best)
    assert conv_widths(best) == conv_widths(pruned) and is_qat(quantized[0])
    meta = checkpoint_metadata(quantized[1])
    assert (
        meta["qat"]["target"] == "cpu"
        and meta["qat"]["freeze_bn"] == qat.freeze_bn
        and meta["prune"]["settings"]["threshold"] == 1e-2
    )
    onnx_path = export(best, ExportConfig(precision="int8", imgsz=64, target="cpu"), out=tmp_path / "best-int8.onnx")
    assert {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["int8_target"] == "cpu"


@pytest.mark.slow
def test_qat_distills_from_a_teacher(pruned, shipped_sparse_weights, train_args, tiny_data):
    """finetune(qat=..., teacher=...): the distillation loss trains beside the detection losses, and the saved model is
    the fake-quantized student at its pruned widths, with its teacher on record."""
    from yoloslim.finetune import finetune
    from yoloslim.utils.checks import load_detection_checkpoint

    args = {k: v for k, v in train_args.items() if k not in {"model", "data"}}
    qat = QatConfig(qat=True, target="tensorrt", calibration_images=4)
    finetune(pruned, data=tiny_data, qat=qat, teacher=shipped_sparse_weights, **{**args, "epochs": 1, "name": "kd"})
    run = Path(args["project"]) / "kd"
    assert "train/dis_loss" in (run / "results.csv").read_text().splitlines()[0]
    model, ckpt = load_detection_checkpoint(run / "weights" / "best.pt")
    assert is_qat(model) and conv_widths(run / "weights" / "best.pt") == conv_widths(pruned)
    assert checkpoint_metadata(ckpt)["finetune"]["teacher"] == str(shipped_sparse_weights)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_a_resumed_run_keeps_batchnorm_as_its_checkpoint_recorded(freeze_bn, shipped_weights, tiny_data, tmp_path):
    """A resumed QAT run trains through FinetuneTrainer, which reads freeze_bn from the checkpoint's qat record."""
    from yoloslim.finetune import FinetuneTrainer
    from yoloslim.utils.checks import load_detection_checkpoint

    model, ckpt = load_detection_checkpoint(shipped_weights)
    set_checkpoint_metadata(model, {"qat": {"target": "cpu", "freeze_bn": freeze_bn}})
    weights = tmp_path / "last.pt"
    torch.save({**ckpt, "model": model}, weights)
    trainer = FinetuneTrainer(overrides={"model": str(weights), "data": str(tiny_data), "project": str(tmp_path)})
    trainer.model, trainer.freeze_layer_names = model.float(), []  # what _setup_train sets before training
    trainer._model_train()
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and all(m.training is not freeze_bn for m in batchnorms)


@pytest.mark.slow
def test_the_int8_benchmark_puts_qat_beside_ptq_against_fp32(pruned, synthetic_data, tmp_path, monkeypatch):
    """tools/bench_int8.py --qat: each QAT checkpoint exported with its trained ranges and evaluated paired against the
    FP32 model; its latency is its flavour's PTQ graph's, so it is not timed again."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_int8", Path(__file__).resolve().parents[1] / "tools" / "bench_int8.py"
    )
    bench_int8 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_int8)
    qat = qat_checkpoint(pruned, synthetic_data, "cpu", tmp_path / "qat-cpu.pt")
    out = tmp_path / "int8"
    argv = ["bench_int8.py", "--weights", str(pruned), "--data", str(synthetic_data), "--imgsz", str(IMGSZ)]
    argv += ["--calibration-images", "4", "--threads", "1", "--rounds", "2", "--per-round", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--qat", str(qat)])
    bench_int8.main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["qat"] == {"cpu": str(qat)}
    assert set(result["accuracy"]["change_against_fp32"]) == {"tensorrt", "cpu", "qat-cpu"}
    assert not any(key.startswith("qat-") for key in result["latency"]["models"])
    assert "INT8, CPU flavour (QAT)" in out.with_suffix(".md").read_text()
    monkeypatch.setattr(sys, "argv", [*argv, "--qat", str(pruned)])
    with pytest.raises(YoloslimError, match="not finetuned quantization-aware"):
        bench_int8.main()
