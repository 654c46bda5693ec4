import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from advdetect import confounding_gradient_features
from advdetect.features import confounding_loss, parameter_names


def reference_features(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients with torch.func, an independent route to the same numbers."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, x):
        return confounding_loss(functional_call(model, (p, buffers), (x.unsqueeze(0),))).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, inputs)
    return torch.stack([per_sample[name].flatten(1).pow(2).sum(1) for name in params], dim=1)


def test_loss_is_sigmoid_bce_against_all_ones_summed_over_classes():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    expected = -torch.log(torch.sigmoid(logits)).sum()
    assert torch.allclose(confounding_loss(logits), expected.unsqueeze(0))


def test_matches_closed_form_on_a_linear_model():
    # logits z = W x + b: dL/dz = sigmoid(z) - 1, so |grad W|^2 = |sigmoid(z) - 1|^2 |x|^2 and |grad b|^2 = |sigmoid(z) - 1|^2
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    residual = (torch.sigmoid(model(x)) - 1).pow(2).sum(1).detach()
    expected = torch.stack([residual * x.pow(2).sum(1), residual], dim=1)
    assert torch.allclose(confounding_gradient_features(model, x), expected, rtol=1e-12)


def test_matches_per_sample_gradients_on_a_batchnorm_cnn_in_float64(tiny_model, tiny_inputs):
    model, inputs = tiny_model.double(), tiny_inputs.double()
    features = confounding_gradient_features(model, inputs, batch_size=4)
    assert features.shape == (len(inputs), len(list(model.parameters())))
    assert features.dtype == torch.float64
    torch.testing.assert_close(features, reference_features(model, inputs), rtol=1e-10, atol=0)
    assert parameter_names(model) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"]


def test_uses_eval_mode_and_restores_mode_and_frozen_parameters(tiny_model, tiny_inputs):
    tiny_model.train()
    tiny_model.conv.weight.requires_grad_(False)
    features = confounding_gradient_features(tiny_model, tiny_inputs)
    assert tiny_model.training and not tiny_model.conv.weight.requires_grad
    assert (features[:, 0] > 0).all()  # the frozen tensor still has its feature
    tiny_model.eval()
    assert torch.allclose(features, confounding_gradient_features(tiny_model, tiny_inputs))
    # one input's features do not depend on the rest of its batch
    assert torch.allclose(features[:1], confounding_gradient_features(tiny_model, tiny_inputs[:1]))
