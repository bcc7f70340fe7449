from torch import nn

from yoloslim.utils.metadata import checkpoint_metadata, set_checkpoint_metadata


def test_metadata_rides_on_the_model_of_a_finished_or_unfinished_checkpoint():
    model = nn.Linear(1, 1)
    set_checkpoint_metadata(model, {"sparsity": {"sr": 0.1}})
    assert checkpoint_metadata({"model": model, "ema": None}) == {"sparsity": {"sr": 0.1}}
    assert checkpoint_metadata({"model": None, "ema": model}) == {"sparsity": {"sr": 0.1}}
    assert checkpoint_metadata({"model": nn.Linear(1, 1)}) == {}


def test_a_distillation_wrapper_keeps_it_on_its_student():
    student, wrapper = nn.Linear(1, 1), nn.Module()
    wrapper.student_model = student
    set_checkpoint_metadata(wrapper, {"finetune": {"teacher": "base.pt"}})
    assert student.yoloslim == {"finetune": {"teacher": "base.pt"}}
    assert checkpoint_metadata({"model": student}) == checkpoint_metadata({"ema": wrapper})


def test_checkpoints_of_earlier_versions_are_read_from_their_top_level_key():
    ckpt = {"model": nn.Linear(1, 1), "yoloslim": {"prune": {"settings": {"ratio": 0.4}}}}
    assert checkpoint_metadata(ckpt) == {"prune": {"settings": {"ratio": 0.4}}}
