import pytest
import torch

from worldmodel.encoder import ConvEncoder, EncoderConfig, ViTEncoder, build_encoder

TINY = dict(proj_hidden=32, conv_channels=8, conv_stages=3, vit_width=32, vit_depth=2, vit_heads=2)


def tiny(kind: str, image_size: int = 64, **overrides):
    """A tiny encoder of 16-d latents for ``image_size`` px frames."""
    patch = 8 if image_size <= 64 else 16
    return build_encoder(EncoderConfig(kind=kind, patch_size=patch, **{**TINY, **overrides}), image_size, 16)


def frames(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("kind", ["conv", "vit"])
@pytest.mark.parametrize("size", [64, 32, 96])
def test_shapes(kind, size):
    enc = tiny(kind, size)
    assert isinstance(enc, {"conv": ConvEncoder, "vit": ViTEncoder}[kind])
    assert enc(frames(4, size)).shape == (4, 16)
    assert enc(frames(6, size).view(2, 3, 3, size, size)).shape == (2, 3, 16)  # leading (B, T) dims


@pytest.mark.parametrize("kind", ["conv", "vit"])
def test_uint8_and_unit_float_agree(kind):
    enc = tiny(kind).eval()
    x = frames(4, 64)
    torch.testing.assert_close(enc(x), enc(x.float() / 255))


@pytest.mark.parametrize("kind", ["conv", "vit"])
def test_different_images_give_different_latents(kind):
    enc = tiny(kind).eval()
    z = enc(frames(8, 64))
    dists = torch.cdist(z, z) + torch.eye(8) * 1e9
    assert dists.min() > 1e-3


@pytest.mark.parametrize("kind", ["conv", "vit"])
def test_batchnorm_train_and_eval(kind):
    enc = tiny(kind)
    x = frames(8, 64)
    enc.train()
    z = enc(x)
    z.square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())
    # train mode standardises the projector's hidden units over the batch, eval uses running stats
    enc.eval()
    with torch.no_grad():
        z_eval, z_single = enc(x), enc(x[:1])
    assert torch.isfinite(z_eval).all() and not torch.allclose(z, z_eval)
    torch.testing.assert_close(z_single, z_eval[:1], rtol=1e-4, atol=1e-5)  # eval: per-frame, batch-independent


def test_conv_accepts_sizes_it_was_not_built_for():
    enc = tiny("conv", 64)
    assert enc(frames(2, 48)).shape == (2, 16)


def test_unknown_kind():
    with pytest.raises(ValueError):
        build_encoder(EncoderConfig(kind="resnet"), 64, 16)
