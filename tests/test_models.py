import pytest
import torch

from atomo_core.models import MODEL_NAMES, build_model
from services.common.spec import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_names_match_the_run_spec():
    assert set(MODEL_NAMES) == set(MODELS)


@pytest.mark.parametrize(("name", "params"), [("resnet18", 11_173_962), ("vgg11_bn", 9_756_426)])
def test_parameter_counts_match_table_2(name, params):
    assert count(build_model(name, num_classes=10, in_channels=3)) == params


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes(name):
    for in_channels in (1, 3):
        for num_classes in (10, 100):
            model = build_model(name, num_classes=num_classes, in_channels=in_channels)
            out = model(torch.randn(2, in_channels, 32, 32))
            assert out.shape == (2, num_classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_init_is_determined_by_the_torch_seed(name):
    torch.manual_seed(7)
    first = build_model(name).state_dict()
    torch.manual_seed(7)
    second = build_model(name).state_dict()
    torch.manual_seed(8)
    other = build_model(name).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet18", "vgg11_bn"])
def test_every_parameter_gets_a_gradient(name):
    model = build_model(name, in_channels=1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*resnet18"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="must be positive"):
        build_model("mlp", num_classes=0)


def test_the_narrow_vgg_has_over_a_million_parameters_and_takes_28x28_inputs():
    """`atomo bench table6`'s model: VGG-11-BN at 5/16 width, its last pool adaptive."""
    model = build_model("vgg11_bn_narrow", num_classes=10, in_channels=1)
    assert count(model) == 1_252_978
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
