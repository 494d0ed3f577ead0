"""fusedconv.model_specs: specs -> models (nothing downloaded), weights files, randomized BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fusedconv import model_specs


def test_parse_spec():
    assert model_specs.parse_spec("smp:Unet:resnet34") == ("smp", ["Unet", "resnet34"])
    assert model_specs.parse_spec("some/file.pt") == ("file", ["some/file.pt"])
    with pytest.raises(model_specs.ModelSpecError, match="timm:NAME"):
        model_specs.parse_spec("timm:")


def test_timm_and_smp_specs_build():
    timm_model = model_specs.build_model("timm:resnet18")
    assert not timm_model.training
    assert model_specs.default_input_size("timm:resnet18", timm_model)[1:] == (3, 224, 224)
    smp_model = model_specs.build_model("smp:unet:resnet18")  # architecture names are case-insensitive
    assert type(smp_model).__name__ == "Unet"
    with pytest.raises(model_specs.ModelSpecError, match="unknown smp encoder"):
        model_specs.build_model("smp:Unet:no_such_encoder")


def test_randomize_batchnorm_is_seeded_and_leaves_other_modules_alone():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()

    a, b, c = (model_specs.randomize_batchnorm(net(), seed=s) for s in (1, 1, 2))
    assert torch.equal(a[1].running_var, b[1].running_var) and torch.equal(a[1].bias, b[1].bias)
    assert not torch.equal(a[1].running_mean, c[1].running_mean)
    assert not torch.equal(a[1].running_var, torch.ones(4)) and bool((a[1].running_var > 0).all())
    assert torch.equal(a[0].weight, net()[0].weight)


def test_measured_statistics_keep_every_layer_in_the_output():
    torchvision = pytest.importorskip("torchvision")

    def net():
        torch.manual_seed(0)
        return torchvision.models.mobilenet_v2(weights=None).eval()

    example = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x, other = torch.randn(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def sensitivity(model):
        with torch.no_grad():
            a, b = model(x), model(other)
        return float((a - b).abs().max() / a.abs().max())

    blind, measured = model_specs.randomize_batchnorm(net(), 3), model_specs.randomize_batchnorm(net(), 3, example)
    assert sensitivity(blind) < 1e-5 < 1e-3 < sensitivity(measured)  # (2.2e-7 and 6.4e-3 here)
    again = model_specs.randomize_batchnorm(net(), 3, example)
    norms = [(a, b) for a, b in zip(measured.modules(), again.modules()) if isinstance(a, nn.BatchNorm2d)]
    assert all(torch.equal(a.running_var, b.running_var) and torch.equal(a.bias, b.bias) for a, b in norms)
    # Left as it was: eval mode, the default momentum, one batch tracked as before.
    assert all(not a.training and a.momentum == 0.1 and int(a.num_batches_tracked) == 0 for a, _ in norms)


def test_measured_statistics_fall_back_to_blind_ones_when_the_example_fails():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    one = torch.randn(1, 3)  # BatchNorm1d in training mode refuses one value per channel
    model_specs.randomize_batchnorm(model, 5, one)
    bn = model[1]
    assert not bn.training and bn.momentum == 0.1
    assert bool(((bn.running_var >= 0.5) & (bn.running_var <= 2.0)).all())  # the blind range
    ops = pytest.importorskip("torchvision.ops")
    frozen = nn.Sequential(nn.Conv2d(3, 4, 1), ops.FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model_specs.randomize_batchnorm(frozen, 5, torch.randn(2, 3, 4, 4))  # FrozenBatchNorm2d cannot measure
    assert bool(((frozen[1].running_var >= 0.5) & (frozen[1].running_var <= 2.0)).all())
    assert bool(((frozen[3].running_var >= 0.5) & (frozen[3].running_var <= 2.0)).all())


def test_load_weights_is_strict_and_names_the_argument(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    other = nn.Sequential(nn.Conv2d(3, 4, 1))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(model_specs.ModelSpecError, match="--weights .*does not match the model"):
        model_specs.load_weights(model, str(tmp_path / "other.pth"))
    source = model_specs.randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), seed=3)
    torch.save(source.state_dict(), tmp_path / "same.pth")
    model_specs.load_weights(model, str(tmp_path / "same.pth"))
    assert torch.equal(model[1].running_mean, source[1].running_mean)


def test_run_convert_returns_the_model_and_its_report():
    model = model_specs.randomize_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval(), seed=4)
    x = torch.randn(1, 3, 8, 8)
    fused, report = model_specs.run_convert(model, example_inputs=(x,))
    assert len(report.fused) == 1 and report.max_rel_error is not None
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), rtol=1e-4, atol=1e-5)
