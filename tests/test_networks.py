"""The raw architectures (SimpleUNet, EDMUNet): shapes, the bottleneck the GAN head reads, parameter
counts, class conditioning, config round trip and one training step through build_denoiser. CPU, small."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dmd2.config.settings import ARCH_SETTINGS
from dmd2.io.weights import arch_kwargs, build_denoiser
from dmd2.method.losses import denoising_loss
from dmd2.networks import ARCHITECTURES, count_parameters
from dmd2.networks.edm_unet import EDMUNet, PositionalEmbedding
from dmd2.networks.precond import EDMPrecond
from dmd2.networks.simple_unet import SimpleUNet
from tests.conftest import compose_cfg

# EDM's CIFAR-10 DDPM++ (Karras et al. 2022; NVlabs/edm `--arch=ddpmpp --cond=1`), 10 classes, 32x32.
EDM_CIFAR10 = dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                   attn_resolutions=(16,), dropout=0.13)
# Counted from this implementation, and equal to NVlabs/edm's SongUNet built with the same arguments
# (checked once by loading that network's state dict into this one, outside the test suite). EDM
# reports the model as ~55.7M ("56M"); its released checkpoints add a 9-dim augment-label input.
EDM_CIFAR10_PARAMS = 55_734_147
EDM_CIFAR10_PARAMS_WITH_AUGMENT = 55_735_299  # + 9 * 128 (augment_dim 9, bias-free)
SIMPLE_UNET_DEFAULT_PARAMS = 21_090_115
TINY_EDM = dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16,), dropout=0.0)


def _inputs(batch: int, labels: list[int] | None = None, res: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=gen)
    c_noise = torch.randn(batch, generator=gen)
    y = torch.tensor(labels) if labels is not None else torch.arange(batch) % 10
    return x, c_noise, y


def _rerandomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Replace the (partly near-zero) initialisation by O(1)-gain random weights, so that conditioning
    effects are not hidden behind EDM's 1e-5-scaled residual branches."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
    return net



def edm_kwargs(**values) -> dict:
    """EDMUNet constructor arguments: the edm_unet settings' defaults updated with ``values``."""
    return arch_kwargs({"name": "edm_unet", **values})


@pytest.fixture(scope="module")
def edm_cifar10() -> EDMUNet:
    torch.manual_seed(0)
    return EDMUNet(num_classes=10, resolution=32, **edm_kwargs(**EDM_CIFAR10)).eval()


def test_parameter_counts_at_published_width(edm_cifar10):
    assert count_parameters(edm_cifar10) == EDM_CIFAR10_PARAMS
    assert abs(EDM_CIFAR10_PARAMS / 55.7e6 - 1) < 0.01
    aug = EDMUNet(num_classes=10, resolution=32, **edm_kwargs(augment_dim=9, **EDM_CIFAR10))
    assert count_parameters(aug) == EDM_CIFAR10_PARAMS_WITH_AUGMENT
    assert count_parameters(SimpleUNet(num_classes=10, resolution=32, **arch_kwargs({"name": "simple_unet"}))) == SIMPLE_UNET_DEFAULT_PARAMS


def test_edm_unet_published_width_shapes_and_bottleneck(edm_cifar10):
    net = edm_cifar10
    assert (net.bottleneck_channels, net.bottleneck_resolution) == (256, 8)
    x, c_noise, y = _inputs(1)
    with torch.no_grad():
        out, bottleneck = net(x, c_noise, y), net.encode(x, c_noise, y).h
    assert out.shape == (1, 3, 32, 32) and bottleneck.shape == (1, 256, 8, 8)
    assert torch.isfinite(out).all() and torch.isfinite(bottleneck).all()


def test_simple_unet_default_shapes_and_bottleneck():
    net = SimpleUNet(num_classes=10, resolution=32, **arch_kwargs({"name": "simple_unet"})).eval()
    x, c_noise, y = _inputs(2)
    with torch.no_grad():
        out, bottleneck = net(x, c_noise, y), net.encode(x, c_noise, y).h
        plain = net(x, c_noise, y)
    assert out.shape == (2, 3, 32, 32) and bottleneck.shape == (2, net.bottleneck_channels, 4, 4)
    assert net.bottleneck_channels == 512 and torch.equal(plain, out)
    assert getattr(net, "bottleneck_resolution", 4) == 4  # 32 / 2^(len(channels) - 1)


@pytest.mark.parametrize("name,kwargs", [
    ("simple_unet", dict(channels=(16, 32, 32), noise_emb_dim=32, emb_dim=64)),
    ("edm_unet", TINY_EDM),
])
def test_class_conditioning_changes_the_output(name, kwargs):
    net = _rerandomize(ARCHITECTURES[name](num_classes=10, resolution=32, **arch_kwargs({"name": name, **kwargs}))).eval()
    x, c_noise, _ = _inputs(2)
    with torch.no_grad():
        a = net(x, c_noise, torch.tensor([0, 1]))
        b = net(x, c_noise, torch.tensor([0, 7]))
        again = net(x, c_noise, torch.tensor([0, 1]))
    assert torch.equal(a, again)
    assert torch.allclose(a[0], b[0], atol=1e-5)  # same label, same sample: same output
    assert (a[1] - b[1]).abs().mean() > 1e-2 * a[1].abs().mean()


def test_edm_unet_tiny_shapes_at_other_resolution():
    net = EDMUNet(num_classes=10, resolution=16, **edm_kwargs(**{**TINY_EDM, "attn_resolutions": (8,)})).eval()
    x, c_noise, y = _inputs(3, res=16)
    out, bottleneck = net(x, c_noise, y), net.encode(x, c_noise, y).h
    assert out.shape == (3, 3, 16, 16)
    assert bottleneck.shape == (3, net.bottleneck_channels, net.bottleneck_resolution, net.bottleneck_resolution)
    assert (net.bottleneck_channels, net.bottleneck_resolution) == (32, 4)


@pytest.mark.parametrize("variant", [
    dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1)),
    dict(encoder_type="skip", decoder_type="skip"),
    dict(num_heads=2, augment_dim=9, label_dropout=0.1),
])
def test_edm_unet_variants_run(variant):
    net = EDMUNet(num_classes=10, resolution=32, **edm_kwargs(**{**TINY_EDM, **variant}))
    x, c_noise, y = _inputs(2)
    out, bottleneck = net(x, c_noise, y, torch.zeros(2, 9)), net.encode(x, c_noise, y, torch.zeros(2, 9)).h
    assert out.shape == x.shape and bottleneck.shape == (2, 32, 8, 8)


def test_positional_embedding_frequencies_and_order():
    """EDM's DDPM++ noise embedding: frequencies 1 .. 1/10000 with both endpoints; the net uses [sin | cos]."""
    emb = PositionalEmbedding(8, max_positions=10000, endpoint=True)
    e = emb(torch.tensor([0.0, 1.0]))
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    assert torch.allclose(e[1], torch.cat([freqs.cos(), freqs.sin()]), atol=1e-6)


def test_label_map_sees_scaled_one_hot():
    """Integer labels act as one-hot vectors scaled by sqrt(num_classes), as in EDM; float label vectors
    are accepted as-is (all zeros = no class)."""
    net = _rerandomize(EDMUNet(num_classes=10, resolution=32, **edm_kwargs(**TINY_EDM))).eval()
    x, c_noise, _ = _inputs(2)
    labels = torch.tensor([3, 9])
    with torch.no_grad():
        from_int = net(x, c_noise, labels)
        from_onehot = net(x, c_noise, torch.nn.functional.one_hot(labels, 10).float())
        seen = []
        hook = net.map_label.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        net(x, c_noise, labels)
        hook.remove()
    assert torch.equal(from_int, from_onehot)
    assert torch.allclose(seen[0], torch.nn.functional.one_hot(labels, 10).float() * math.sqrt(10))


def test_tiny_edm_unet_through_build_denoiser_trains():
    torch.manual_seed(0)
    denoiser = build_denoiser({"name": "edm_unet", **TINY_EDM, "dropout": 0.1}, 10, 32, 0.5)
    assert isinstance(denoiser, EDMPrecond) and isinstance(denoiser.net, EDMUNet)
    x0, _, y = _inputs(4)
    x0 = x0.clamp(-1, 1)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0])
    loss = denoising_loss(denoiser, x0, sigma, y, torch.randn_like(x0))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in denoiser.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("arch,expected_params", [("edm_unet", EDM_CIFAR10_PARAMS), ("edm_unet_small", 1_754_499)])
def test_edm_arch_configs_hold_every_constructor_key(arch, expected_params):
    cfg = compose_cfg([f"arch={arch}"])
    arch_cfg = OmegaConf.to_container(cfg.arch, resolve=True)
    assert arch_cfg["name"] == "edm_unet"
    ctor = set(inspect.signature(EDMUNet.__init__).parameters) - {"self", "num_classes", "resolution"}
    assert set(arch_cfg) - {"name"} == ctor  # the composed arch names every constructor argument
    with torch.device("meta"):  # count without allocating
        net = ARCHITECTURES["edm_unet"](num_classes=10, resolution=32, **arch_kwargs(arch_cfg))
    assert count_parameters(net) == expected_params


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_constructors_take_exactly_the_settings_of_their_schema(name):
    """One definition: a network's constructor has no defaults of its own, and its arguments are the fields of
    its settings schema (dmd2/config/settings.py) plus the data's num_classes and resolution."""
    params = inspect.signature(ARCHITECTURES[name].__init__).parameters
    assert all(p.default is inspect.Parameter.empty for n, p in params.items() if n != "self")
    fields = {f.name for f in dataclasses.fields(ARCH_SETTINGS[name])} - {"name"}
    assert set(params) - {"self", "num_classes", "resolution"} == fields


def test_old_arch_dicts_load_with_schema_defaults():
    """A checkpoint's arch dict lacking a later-added key builds with that key's default."""
    full = arch_kwargs({"name": "edm_unet", **TINY_EDM})
    partial = arch_kwargs({"name": "edm_unet", "model_channels": 16})
    assert partial["norm_max_groups"] == full["norm_max_groups"] == 32 and partial["model_channels"] == 16


@pytest.mark.parametrize("name,kwargs", [
    ("simple_unet", dict(channels=(16, 32), noise_emb_dim=16, emb_dim=32, groups=4, dropout=0.0)),
    ("edm_unet", TINY_EDM),
])
def test_denoise_first_denoises_a_prefix_and_keeps_every_bottleneck(name, kwargs):
    """The GAN classifier's fast path: only the first n samples go through the decoder."""
    torch.manual_seed(0)
    denoiser = build_denoiser({"name": name, **kwargs}, 10, 32, 0.5).eval()
    x, sigma, y = torch.randn(6, 3, 32, 32), torch.rand(6) * 5 + 0.1, torch.randint(0, 10, (6,))
    with torch.no_grad():
        full, full_features = denoiser(x, sigma, y), denoiser.denoise_first(x, sigma, y, len(x))[1]
        part, features = denoiser.denoise_first(x, sigma, y, 2)
        none, only_features = denoiser.denoise_first(x, sigma, y, 0)
    assert part.shape == (2, 3, 32, 32) and none.shape == (0, 3, 32, 32)
    torch.testing.assert_close(part, full[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features, full_features)
    torch.testing.assert_close(only_features, full_features)
