import json

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
    assert set(state["stages"]) == {"sparse", "prune"} and state["stages"]["sparse"]["skipped"] is False
    pruned = tmp_path / "run" / "pruned.pt"
    stamp = pruned.stat().st_mtime_ns

    monkeypatch.setattr(Pipeline, "stage_finetune", real_finetune)
    report = slim(config)
    assert pruned.stat().st_mtime_ns == stamp  # finished stages are not redone
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert list(state["stages"]) == ["sparse", "prune", "finetune", "export", "evaluate", "bench", "report"]
    # the budget of 3 epochs: sparsity may take half (1), the finetune gets what it left
    assert state["stages"]["sparse"]["epochs"] == 1 and state["stages"]["finetune"]["epochs"] == 2
    html = report.read_text()
    assert "not measured" in html and "finetuned INT8 Q/DQ" in html and "data:image/png;base64" in html
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gamma_history"]["epochs"] and summary["prune"]["widths"]
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
    assert SlimConfig().prune_config(320).target_flops == 0.5
    assert SlimConfig(ratio=0.3).prune_config(320).target_flops is None
