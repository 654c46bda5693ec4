import math

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from advdetect import confounding_gradient_features
from advdetect.signatures.features import confounding_loss, parameter_names


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
    # logits z = W x + b: dL/dz = sigmoid(z) - 1, so |grad W|^2 = |sigmoid(z) - 1|^2 |x|^2
    # and |grad b|^2 = |sigmoid(z) - 1|^2
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


# --- the batched path against the per-sample loop ---------------------------------------------

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from advdetect.signatures import features as features_module  # noqa: E402
from advdetect.signatures.features import per_sample_loop_features  # noqa: E402


class BasicBlock(nn.Module):
    """torchvision's ResNet block: in-place ReLU and an in-place residual add on captured outputs."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.relu(out)


class TiedWeights(nn.Module):
    """One Linear called twice, and a weight used by a second layer and directly in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)
        self.scale = nn.Parameter(torch.rand(6))  # used outside any supported layer

    def forward(self, x):
        h = torch.tanh(self.shared(x.flatten(1)))
        h = torch.tanh(self.shared(h)) * self.scale
        return self.head(h) + F.linear(h, self.head.weight)


class Tokens(nn.Module):
    """Embedding, LayerNorm and Linear over a sequence (the ghost-norm path for Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 32, padding_idx=0)
        self.norm = nn.LayerNorm(32)
        self.proj = nn.Linear(32, 32)  # 32 * 32 weights > 9 * 9 token pairs * 64: the ghost norm is cheaper
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.relu(self.proj(self.norm(self.embed(x)))).mean(1))


def architectures():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5)), (2, 2, 3)),
        "resnet_block": (nn.Sequential(BasicBlock(3, 8, 2), BasicBlock(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(8, 10)), (3, 8, 8)),
        "grouped_depthwise": (nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
                                            nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
                                            nn.GroupNorm(2, 8), nn.Conv2d(8, 16, 2, stride=2, dilation=1),
                                            nn.Conv2d(16, 32, 3, padding="same", dilation=2),  # ghost norm: L small
                                            nn.Flatten(), nn.Linear(32 * 16, 3)), (4, 8, 8)),
        "conv1d": (nn.Sequential(nn.Conv1d(2, 4, 3, padding=2, dilation=2, padding_mode="circular"),
                                 nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 4, 2, stride=2), nn.Flatten(),
                                 nn.Linear(4 * 5, 3)), (2, 10)),
        "tied_and_custom": (nn.Sequential(TiedWeights(), nn.PReLU(4)), (6,)),
        "tokens": (Tokens(), None),
    }


@pytest.mark.parametrize("name", list(architectures()))
def test_batched_features_match_the_per_sample_loop_in_float64(name, monkeypatch):
    model, shape = architectures()[name]
    model = model.double()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    generator = torch.Generator().manual_seed(1)
    if shape is None:
        inputs = torch.randint(0, 11, (7, 9), generator=generator)
        inputs[:, -2:] = 0  # padding tokens
    else:
        inputs = torch.rand(7, *shape, generator=generator, dtype=torch.float64)
    expected = per_sample_loop_features(model, inputs)
    monkeypatch.setattr(features_module, "per_sample_loop_features", None)  # the batched path must not use it
    actual = confounding_gradient_features(model, inputs, batch_size=4)
    assert actual.shape == expected.shape
    relative = ((actual - expected).abs() / expected.abs().clamp_min(1e-300)).max()
    assert relative <= 1e-4, f"max relative error {relative:.2e}"


def test_batched_features_are_exact_to_1e3_in_float32(tiny_model, tiny_inputs):
    expected = per_sample_loop_features(tiny_model, tiny_inputs)
    actual = confounding_gradient_features(tiny_model, tiny_inputs)
    assert ((actual - expected).abs() / expected).max() <= 1e-3


def test_batchnorm_without_running_statistics_uses_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
                          nn.Linear(8, 3))
    inputs = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(confounding_gradient_features(model, inputs), per_sample_loop_features(model, inputs))


def test_ablation_losses_and_labels_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # softmax [1/4, 3/4]
    # softmax BCE against all ones: -(log 1/4 + log 3/4) = log(16/3) = 1.673976
    assert confounding_loss(logits, "ones", "softmax_bce").item() == pytest.approx(math.log(16 / 3), rel=1e-9)
    # the "not_predicted" label is 1 on class 0 only: softmax BCE = -log(1/4) - log(1 - 3/4) = 2 log 4
    assert confounding_loss(logits, "not_predicted", "softmax_bce").item() == pytest.approx(2 * math.log(4), rel=1e-6)
    # "half" of two classes is class 0: sigmoid BCE = softplus(-0) + softplus(log 3) = log 2 + log 4
    assert confounding_loss(logits, "half").item() == pytest.approx(math.log(2) + math.log(4), rel=1e-9)


@pytest.mark.parametrize(("label", "loss"), [("half", "sigmoid_bce"), ("not_predicted", "softmax_bce")])
def test_batched_ablations_match_the_loop(tiny_model, tiny_inputs, label, loss):
    model, inputs = tiny_model.double(), tiny_inputs.double()
    torch.testing.assert_close(confounding_gradient_features(model, inputs, label=label, loss=loss),
                               per_sample_loop_features(model, inputs, label=label, loss=loss))


def test_l1_norm_ablation_is_the_l1_norm_of_each_gradient(tiny_model, tiny_inputs):
    model, x = tiny_model.double(), tiny_inputs[:1].double()
    grads = torch.autograd.grad(confounding_loss(model(x)).sum(), list(model.parameters()))
    expected = torch.stack([g.abs().sum() for g in grads])
    torch.testing.assert_close(confounding_gradient_features(model, x, norm="l1")[0], expected)


def test_prediction_instability_by_hand():
    import numpy as np

    from advdetect.signatures.features import prediction_instability

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)).eval()
    inputs = torch.rand(5, 1, 2, 3)
    levels, draws = (0.05, 0.3), 4
    noise = torch.randn((len(levels), draws, 1, 2, 3), generator=torch.Generator().manual_seed(7))
    expected = np.zeros((5, 4))
    with torch.no_grad():
        for i, x in enumerate(inputs):
            p = torch.softmax(model(x[None]).double(), 1)[0]
            for j, level in enumerate(levels):
                flips, kl = 0, 0.0
                for d in range(draws):
                    q = torch.softmax(model((x + level * noise[j, d]).clamp(0, 1)[None]).double(), 1)[0]
                    flips += int(q.argmax() != p.argmax())
                    kl += float((p * (p.log() - q.log())).sum()) / draws
                expected[i, 2 * j : 2 * j + 2] = [(flips + 0.5) / (draws + 1), max(kl, 1e-12)]
    got = prediction_instability(model, inputs, levels, draws, seed=7, batch_size=2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    # the same noise for every input: an input's signature does not depend on its batch
    # (to float32 rounding: BLAS may pick another kernel for another batch size)
    np.testing.assert_allclose(prediction_instability(model, inputs[3:], levels, draws, seed=7, batch_size=64),
                               got[3:], rtol=1e-6, atol=1e-12)
    assert prediction_instability(model, inputs[:0], levels, draws).shape == (0, 4)


def test_prediction_instability_runs_the_model_on_at_most_a_batch():
    from advdetect.signatures.features import prediction_instability

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)).eval()
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    prediction_instability(model, torch.rand(5, 1, 2, 3), (0.05, 0.3), 4, batch_size=2)
    assert max(sizes) == 2  # never the batch times the draws (GPU memory)
    assert sum(sizes) == 5 * (1 + 2 * 4)
