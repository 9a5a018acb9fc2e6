"""The template's CNN: shapes, names and the checkpoint format round trip."""

from __future__ import annotations

from pathlib import Path

import torch

from digitflow.training.checkpoint import load_model, save_checkpoint
from digitflow.training.net import Net


def test_net_maps_a_batch_of_28x28_images_to_ten_log_probabilities() -> None:
    model = Net().eval()
    with torch.inference_mode():
        output = model(torch.rand(5, 1, 28, 28))
    assert tuple(output.shape) == (5, 10)
    assert torch.allclose(output.exp().sum(1), torch.ones(5), atol=1e-5)


def test_net_keeps_the_template_layer_names_and_sizes() -> None:
    shapes = {name: tuple(p.shape) for name, p in Net().state_dict().items()}
    assert shapes == {
        "conv1.weight": (32, 1, 3, 3),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "fc1.weight": (128, 9216),
        "fc1.bias": (128,),
        "fc2.weight": (10, 128),
        "fc2.bias": (10,),
    }
    assert {"dropout1", "dropout2"} <= {name for name, _ in Net().named_children()}


def test_checkpoint_uses_the_template_format_and_loads_in_eval_mode(tmp_path: Path) -> None:
    model = Net()
    optimiser = torch.optim.Adadelta(model.parameters())
    path = tmp_path / "model" / "model.pt"
    save_checkpoint(path, model, optimiser, epoch=3, train_loss=0.5, test_loss=0.25)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {
        "model_state_dict",
        "epoch",
        "optimiser_state_dict",
        "train_loss",
        "test_loss",
    }
    assert raw["epoch"] == 3 and raw["test_loss"] == 0.25
    loaded = load_model(path)
    assert not loaded.training
    sample = torch.rand(2, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(sample), model.eval()(sample))
