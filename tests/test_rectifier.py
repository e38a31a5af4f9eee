import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ngdm_core.edit_friendly import invert_ddim
import ngdm_core.rectifier
from ngdm_core.rectifier import (Rectifier, SeparableConvModulation, conv_targets, ddpm_alpha_bar, edit_loss_terms,
                                 edit_training_loss, load_rectifier, noise_fitting_loss, noised, predicted_x0,
                                 predicted_x0_at, read_rectifier, rectified, rectified_eps, require_fits,
                                 save_rectifier, separable_offset, timestep_embedding, train_edit_rectifier,
                                 train_rectifier)
from ngdm_core.samplers import sample_euler
from ngdm_core.shapes.data import HELD_OUT_SEED, make_batch, other_class
from ngdm_core.shapes.edits import EditSettings, ddim_reconstruction
from ngdm_core.shapes.model import NULL_CLASS, UNET_FILE, ShapesDenoiser, ShapesUNet, load_classifier, load_model
from ngdm_core.shapes.rectifier import (RectifiedShapesDenoiser, class_embeddings, edit_directions, image_features,
                                        new_rectifier as new_shapes_rectifier)

CHANNELS = 3
CLASSES = 3
SIZE = 16
TARGETS = ["mid", "up.1", "out"]
ALPHA_BAR = ddpm_alpha_bar()


class TinyEpsNet(nn.Module):
    """A random-weight U-Net-shaped eps predictor: down, middle, up with a skip, optionally class-conditioned."""

    def __init__(self, width: int = 16, mid_kernel: int = 3):
        super().__init__()
        self.time = nn.Linear(16, width)
        self.inp = nn.Conv2d(CHANNELS, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(width, width, mid_kernel, padding=mid_kernel // 2)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1))
        self.out = nn.Conv2d(2 * width, CHANNELS, 3, padding=1)
        # Made last, so the layers above draw the same initial weights as before it existed.
        self.classes = nn.Embedding(CLASSES, width)

    def forward(self, x, t, cond=None):
        embedding = self.time(timestep_embedding(t, 16)) + (0 if cond is None else self.classes(cond))
        skip = F.silu(self.inp(x) + embedding[:, :, None, None])
        h = F.silu(self.up(F.silu(self.mid(F.silu(self.down(skip))))))
        return self.out(torch.cat([h, skip], dim=1))


def blob_images(count: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1] of a few coloured Gaussian blobs over a random stripe texture."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, SIZE)
    y, x = grid[:, None], grid[None, :]
    images = []
    for _ in range(count):
        angle, frequency = torch.rand(2, generator=generator) * torch.tensor([3.14, 12.0])
        image = 0.3 * torch.sin(frequency * (x * angle.cos() + y * angle.sin()))[None].repeat(CHANNELS, 1, 1)
        for _ in range(3):
            cy, cx, radius = torch.rand(3, generator=generator) * torch.tensor([1.0, 1.0, 0.2]) + torch.tensor([0, 0, 0.1])
            colour = torch.rand(CHANNELS, 1, 1, generator=generator) * 2 - 1
            image = image + colour * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))
        images.append(image.clamp(-1, 1))
    return torch.stack(images)


def make_model(seed: int = 0, **kwargs) -> TinyEpsNet:
    torch.manual_seed(seed)
    return TinyEpsNet(**kwargs).eval()


def make_rectifier(model, seed: int = 1) -> Rectifier:
    torch.manual_seed(seed)
    return Rectifier.for_model(model, TARGETS, CHANNELS, width=16, feature_dim=32, time_dim=16)


def held_out():
    generator = torch.Generator().manual_seed(123)
    x0 = blob_images(16, seed=99)
    t = torch.linspace(50, 950, 16).long()
    return x0, t, torch.randn(x0.shape, generator=generator)


def random_factors(rectifier, batch, seed=5, scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    return {name: (scale * torch.randn(batch, 1, c_in, kh, kw, generator=generator),
                   scale * torch.randn(batch, c_out, 1, kh, kw, generator=generator))
            for name, (c_out, c_in, kh, kw) in rectifier.shapes.items()}


def state_copy(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_untouched(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name in TARGETS:
        assert "forward" not in vars(model.get_submodule(name)), name
    assert all(parameter.requires_grad for parameter in model.parameters())


# Trained once for the module: 300 AdamW steps of batch 16 take about 4 s on 2 CPU cores.
@pytest.fixture(scope="module")
def trained():
    model = make_model()
    before = state_copy(model)
    rectifier = make_rectifier(model)
    history = train_rectifier(model, rectifier, blob_images(64, seed=7), steps=300, lr=3e-3, alpha_bar=ALPHA_BAR,
                              batch_size=16, seed=0)
    return model, rectifier, history, before


# --- modulation --------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_grouped_modulated_conv_matches_a_per_sample_loop(stride, groups, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups, padding_mode=padding_mode)
    x = torch.randn(3, 4, 9, 9)
    in_factor = torch.randn(3, 1, 4 // groups, 3, 3)
    out_factor = torch.randn(3, 6, 1, 3, 3)
    output = SeparableConvModulation(conv)(x, in_factor, out_factor)
    for b in range(3):
        offset = torch.stack([torch.stack([in_factor[b, 0, i] * out_factor[b, o, 0] for i in range(4 // groups)])
                              for o in range(6)])
        weight = conv.weight * (1 + offset)
        padded = x[b:b + 1] if padding_mode == "zeros" else F.pad(x[b:b + 1], (1, 1, 1, 1), mode=padding_mode)
        expected = F.conv2d(padded, weight, conv.bias, stride, 1 if padding_mode == "zeros" else 0, 1, groups)
        torch.testing.assert_close(output[b:b + 1], expected, rtol=0, atol=1e-5)


def test_modulated_conv_computes_in_the_inputs_dtype_like_a_manually_cast_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x, in_factor, out_factor = torch.randn(2, 4, 5, 5), torch.randn(2, 1, 4, 3, 3), torch.randn(2, 6, 1, 3, 3)
    output = SeparableConvModulation(conv)(x, in_factor, out_factor)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, SeparableConvModulation(conv)(x.double(), in_factor, out_factor).float(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_the_modulated_convs_gradients_are_exact_for_every_input(groups, padding_mode):
    # Finite differences in float64 against the hand-written backward, for the input, both factors and a
    # base weight and bias that take gradients too (frozen in training, but the op must be right for any).
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups, padding_mode=padding_mode).double()
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
              for shape in ((2, 4, 6, 6), (2, 1, 4 // groups, 3, 3), (2, 6, 1, 3, 3), conv.weight.shape, (6,))]

    def modulated(x, in_factor, out_factor, weight, bias):
        return SeparableConvModulation(conv, weight_and_bias=lambda _, __: (weight, bias))(x, in_factor, out_factor)

    assert torch.autograd.gradcheck(modulated, inputs)


def test_the_modulated_conv_saves_only_its_input_and_the_two_factors_for_backward():
    conv = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    in_factor = torch.randn(2, 1, 8, 3, 3, requires_grad=True)
    out_factor = torch.randn(2, 8, 1, 3, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor.numel()) or tensor, lambda t: t):
        SeparableConvModulation(conv)(x, in_factor, out_factor).sum().backward()
    # The full offset and the modulated weight would be 2 x 8 x 8 x 3 x 3 = 1152 values each.
    assert sorted(saved) == sorted([x.numel(), in_factor.numel(), out_factor.numel()])


def plain_modulated_conv(x, in_factor, out_factor, weight, bias, stride, padding, dilation, groups):
    """The modulated conv as autograd sees the plain expression, keeping the offset and modulated weight."""
    batch = x.shape[0]
    modulated = (weight * (1 + separable_offset(in_factor, out_factor).to(weight))).flatten(0, 1)
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), modulated, None if bias is None else bias.repeat(batch), stride,
                   padding, dilation, batch * groups)
    return out.reshape(batch, -1, *out.shape[2:])


def test_a_training_steps_gradients_equal_autograds_through_the_plain_expression(monkeypatch):
    model = make_model()
    rectifier = make_rectifier(model)
    with torch.no_grad():
        # Nonzero out heads, so that every factor, and every subnet weight, gets a nonzero gradient.
        for subnet in rectifier.subnets:
            subnet.out_head.weight.copy_(0.1 * torch.randn(subnet.out_head.weight.shape,
                                                           generator=torch.Generator().manual_seed(3)))
    x0, t = blob_images(4, seed=7), torch.tensor([100, 400, 700, 950])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))

    def gradients():
        loss = noise_fitting_loss(model, rectifier, x0, t, noise, ALPHA_BAR)
        return torch.autograd.grad(loss, list(rectifier.parameters()))

    names, custom = [name for name, _ in rectifier.named_parameters()], gradients()
    monkeypatch.setattr(ngdm_core.rectifier, "modulated_conv", plain_modulated_conv)
    plain_gradients = gradients()
    print(f"largest difference from autograd's, over each gradient's largest entry: "
          f"{max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(custom, plain_gradients)):.1e}")
    for name, ours, plain in zip(names, custom, plain_gradients, strict=True):
        assert plain.abs().max() > 0, name
        # Both run the same float32 operations (the same convolution_backward, products and broadcast sums;
        # bit-identical on a CPU). A kernel that reorders a reduction of n terms moves it by at most about
        # n * u (u = 6e-8) of its terms' magnitude, here taken as the gradient's largest entry; the longest
        # reduction is the conv weight's gradient over 4 x 16 x 16 pixels, n ~ 1000: 6e-5, so 1e-4. A wrong
        # axis or factor in the backward is off at order 1.
        torch.testing.assert_close(ours, plain, rtol=0, atol=1e-4 * plain.abs().max().item(), msg=name)


def test_separable_offset_is_an_outer_product_per_kernel_position():
    in_factor, out_factor = torch.randn(2, 1, 4, 3, 3), torch.randn(2, 5, 1, 3, 3)
    offset = separable_offset(in_factor, out_factor)
    assert offset.shape == (2, 5, 4, 3, 3)
    assert torch.equal(offset[1, 3, 2], in_factor[1, 0, 2] * out_factor[1, 3, 0])


def test_offsets_for_another_batch_size_are_refused():
    model, x = make_model(), torch.randn(2, CHANNELS, SIZE, SIZE)
    with rectified(model, random_factors(make_rectifier(model), batch=3)), pytest.raises(ValueError, match="batch of 2"):
        model(x, torch.tensor([10, 20]))


def test_non_conv_targets_are_refused():
    with pytest.raises(ValueError, match="must be an nn.Conv2d"):
        Rectifier.for_model(make_model(), ["time"], CHANNELS)
    with pytest.raises(ValueError, match="not a module"):
        Rectifier.for_model(make_model(), ["nope"], CHANNELS)


def test_conv_targets_are_the_convs_inside_the_named_blocks():
    model = nn.Sequential()
    model.add_module("down", nn.Conv2d(1, 1, 3))
    model.add_module("middle", nn.Sequential(nn.Conv2d(1, 1, 3), nn.SiLU(), nn.Conv2d(1, 1, 1)))
    model.add_module("middle_extra", nn.Conv2d(1, 1, 3))
    model.add_module("up", nn.Conv2d(1, 1, 3))
    assert conv_targets(model, ["up", "middle"]) == ["middle.0", "middle.2", "up"]


def test_the_estimate_at_a_given_alpha_bar_matches_the_table_lookup():
    x_t, eps, t = torch.randn(3, CHANNELS, 4, 4), torch.randn(3, CHANNELS, 4, 4), torch.tensor([0, 400, 999])
    assert torch.equal(predicted_x0_at(x_t, eps, ALPHA_BAR[t]), predicted_x0(x_t, eps, t, ALPHA_BAR))


def test_separable_offsets_generate_far_fewer_values():
    counts = make_rectifier(make_model()).generated_parameter_counts(batch_size=2)
    # mid and up.1: 16x16x3x3, out: 3x32x3x3.
    assert counts == {"separable": 2 * 9 * (32 + 32 + 35), "full": 2 * 9 * (256 + 256 + 96)}


# --- identity and the base model -----------------------------------------------------------------


def test_untrained_rectifier_is_the_identity():
    model = make_model()
    x0, t, noise = held_out()
    x_t = noised(x0, noise, t, ALPHA_BAR)
    plain = model(x_t, t)
    torch.testing.assert_close(rectified_eps(model, make_rectifier(model), x_t, t, x0, ALPHA_BAR), plain,
                               rtol=0, atol=1e-6)


def test_random_offsets_change_the_prediction_and_the_model_is_restored():
    model = make_model()
    before = state_copy(model)
    x, t = torch.randn(2, CHANNELS, SIZE, SIZE), torch.tensor([10, 900])
    plain = model(x, t)
    with rectified(model, random_factors(make_rectifier(model), batch=2)):
        assert (model(x, t) - plain).abs().max() > 1e-2
    assert torch.equal(model(x, t), plain)
    assert_untouched(model, before)


def test_model_is_restored_when_the_block_raises():
    model = make_model()
    with pytest.raises(RuntimeError, match="boom"), rectified(model, random_factors(make_rectifier(model), batch=1)):
        raise RuntimeError("boom")
    assert_untouched(model, state_copy(model))


# --- learning ------------------------------------------------------------------------------------


def test_training_lowers_the_held_out_noise_fitting_loss(trained):
    model, rectifier, history, _ = trained
    x0, t, noise = held_out()
    with torch.no_grad():
        untrained = noise_fitting_loss(model, make_rectifier(model), x0, t, noise, ALPHA_BAR).item()
        after = noise_fitting_loss(model, rectifier, x0, t, noise, ALPHA_BAR).item()
    # Measured for base/rectifier seeds 0/1, 1/2, 2/3: 1.065 -> 0.252, 1.041 -> 0.280, 1.039 -> 0.254
    # (ratios 0.24-0.27); the training loss's first/last ten steps went 1.05 -> 0.28. A bound
    # of 0.4 leaves room for platform rounding while failing any rectifier that learned little.
    assert after < 0.4 * untrained
    assert len(history) == 300 and sum(history[-10:]) < 0.5 * sum(history[:10])


def ddim_reconstruction_error(model, rectifier, x0, t_start=500, steps=5, cond=None):
    """SDEdit-like: noise ``x0`` to ``t_start`` with a fixed seed, denoise with DDIM under ``cond``, return the MSE."""
    timesteps = torch.linspace(t_start, 0, steps + 1).long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    x = noised(x0, noise, timesteps[0].repeat(len(x0)), ALPHA_BAR)
    with torch.no_grad():
        for now, after in zip(timesteps[:-1], timesteps[1:]):
            t = now.repeat(len(x0))
            if rectifier is None:
                eps = model(x, t) if cond is None else model(x, t, cond)
            else:
                eps = rectified_eps(model, rectifier, x, t, x0, ALPHA_BAR, cond)
            estimate = predicted_x0(x, eps, t, ALPHA_BAR)
            x = estimate if after == 0 else ALPHA_BAR[after].sqrt() * estimate + (1 - ALPHA_BAR[after]).sqrt() * eps
    return ((x - x0) ** 2).mean().item()


def test_trained_rectifier_lowers_the_sdedit_reconstruction_error(trained):
    model, rectifier, _, _ = trained
    x0 = held_out()[0]
    plain, rectified_error = ddim_reconstruction_error(model, None, x0), ddim_reconstruction_error(model, rectifier, x0)
    # Measured for the three seed pairs above: 13.8 -> 0.59, 12.7 -> 0.72, 12.6 -> 0.65 (ratios
    # 0.04-0.06): the random base model alone reconstructs nothing; 0.15 keeps a wide margin.
    assert rectified_error < 0.15 * plain


def test_training_leaves_the_base_model_untouched(trained):
    model, rectifier, _, before = trained
    x0, t, noise = held_out()
    rectified_eps(model, rectifier, noised(x0, noise, t, ALPHA_BAR), t, x0, ALPHA_BAR).sum().backward()
    assert all(parameter.grad is None for parameter in model.parameters())
    assert_untouched(model, before)


def test_training_is_seeded():
    def run():
        model = make_model()
        return train_rectifier(model, make_rectifier(model), blob_images(8, seed=3), steps=3, batch_size=4, seed=4)

    assert run() == run()


def test_training_works_under_inference_mode():
    model = make_model()
    rectifier = make_rectifier(model)
    reported = []
    with torch.inference_mode():
        data, alpha_bar = blob_images(8, seed=3), ddpm_alpha_bar()
        history = train_rectifier(model, rectifier, data, steps=5, batch_size=4, alpha_bar=alpha_bar, seed=0,
                                  progress=lambda step, total, loss: reported.append((step, total, loss)))
        batches = train_rectifier(model, rectifier, [data[:4], data[4:]], steps=5, alpha_bar=alpha_bar)
        x0, t, noise = held_out()
        output = rectified_eps(model, rectifier, noised(x0, noise, t, ALPHA_BAR), t, x0, ALPHA_BAR)
    assert len(history) == 5 and all(torch.isfinite(torch.tensor(history)))
    assert len(batches) == 2  # an iterable of batches ends the run when it runs out
    assert torch.isfinite(output).all() and not output.requires_grad
    assert reported == [(step, 5, loss) for step, loss in zip(range(1, 6), history)]


def test_a_rectifier_built_under_inference_mode_is_refused_for_training():
    model = make_model()
    with torch.inference_mode():
        rectifier = make_rectifier(model)
    with pytest.raises(ValueError, match="rectifier was created under torch.inference_mode"):
        train_rectifier(model, rectifier, blob_images(4, seed=3), steps=1)


def test_a_model_built_under_inference_mode_is_refused_where_the_gradient_needs_its_weights():
    with torch.inference_mode():
        model = make_model()
    with pytest.raises(ValueError, match="^model has weights created under torch.inference_mode where the rectifier"):
        train_rectifier(model, make_rectifier(make_model()), blob_images(4, seed=3), steps=1)


# --- editing ------------------------------------------------------------------------------------


def test_edit_training_loss_is_a_scalar_whose_gradient_reaches_only_the_rectifier():
    model = make_model()
    rectifier = make_rectifier(model)
    projection = torch.randn(CHANNELS * SIZE * SIZE, 8, generator=torch.Generator().manual_seed(2))
    x0, t, noise = held_out()
    loss = edit_training_loss(model, rectifier, x0, t, noise, ALPHA_BAR, embed=lambda image: image.flatten(1) @ projection,
                              direction=torch.randn(8))
    assert loss.shape == ()
    loss.backward()
    assert all(parameter.grad is None for parameter in model.parameters())
    assert sum(parameter.grad.abs().sum() for parameter in rectifier.parameters()) > 0


# --- files -------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(trained, tmp_path):
    model, rectifier, _, _ = trained
    save_rectifier(rectifier, str(tmp_path / "rectifier.safetensors"))
    loaded = load_rectifier(str(tmp_path / "rectifier.safetensors"), model)
    assert loaded.targets == rectifier.targets
    for (name, value), (loaded_name, loaded_value) in zip(rectifier.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name and torch.equal(value, loaded_value)
    x0, t, noise = held_out()
    x_t = noised(x0, noise, t, ALPHA_BAR)
    with torch.no_grad():
        assert torch.equal(rectified_eps(model, loaded, x_t, t, x0, ALPHA_BAR),
                           rectified_eps(model, rectifier, x_t, t, x0, ALPHA_BAR))


def test_loading_for_a_model_with_other_conv_shapes_is_refused(trained, tmp_path):
    _, rectifier, _, _ = trained
    save_rectifier(rectifier, str(tmp_path / "rectifier.safetensors"))
    with pytest.raises(ValueError, match=r"rectifier was trained for .* but this model has .*'mid': \[16, 16, 5, 5\]"):
        load_rectifier(str(tmp_path / "rectifier.safetensors"), make_model(mid_kernel=5))


def test_a_rectifier_read_without_a_model_is_checked_before_use(trained, tmp_path):
    model, rectifier, _, _ = trained
    save_rectifier(rectifier, str(tmp_path / "rectifier.safetensors"))
    loaded = read_rectifier(str(tmp_path / "rectifier.safetensors"))
    require_fits(loaded, model)
    with pytest.raises(ValueError, match=r"\{'mid': \[16, 16, 3, 3\]\} but this model has \{'mid': \[16, 16, 5, 5\]\} "
                                         r"\(1 of 3 targeted layers differ\)"):
        require_fits(loaded, make_model(mid_kernel=5))


@pytest.fixture(scope="module")
def shapes_reconstruction():
    """The shipped shapes U-Net, and a rectifier trained 200 steps to reconstruct 8 held-out sources under the
    unconditional branch (the empty prompt of the ComfyUI example), with its held-out figures before and after."""
    unet = load_model(ShapesUNet, UNET_FILE)
    sources = make_batch(HELD_OUT_SEED, 8).images
    unconditional = torch.full((len(sources),), NULL_CLASS)
    rectifier = new_shapes_rectifier(unet, seed=1)
    t = torch.linspace(50, 950, 8).long()
    noise = torch.randn(sources.shape, generator=torch.Generator().manual_seed(5))

    def figures():
        with torch.no_grad():
            loss = noise_fitting_loss(unet, rectifier, sources, t, noise, ALPHA_BAR, unconditional).item()
        return loss, ddim_reconstruction_error(unet, rectifier, sources, steps=10, cond=unconditional)

    before = figures()
    train_rectifier(unet, rectifier, sources, steps=200, lr=3e-3, alpha_bar=ALPHA_BAR, batch_size=8, seed=0,
                    conditions=unconditional)
    return unet, rectifier, before, figures()


def test_a_rectifier_makes_the_shipped_shapes_model_more_faithful_to_its_sources(shapes_reconstruction):
    _, _, (loss_before, error_before), (loss_after, error_after) = shapes_reconstruction
    print(f"shapes model: held-out loss {loss_before:.4f} -> {loss_after:.4f} ({loss_after / loss_before:.2f}), "
          f"SDEdit MSE {error_before:.4f} -> {error_after:.4f} ({error_after / error_before:.2f})")
    # A trained model already fits noise well (0.019 here), so the gain is smaller than on the
    # random model. Measured on three source sets and seeds: loss ratios 0.82, 0.83, 0.77 and
    # SDEdit MSE ratios 0.79, 0.74, 0.85 (0.061 -> 0.048 for this one).
    assert loss_after < 0.9 * loss_before
    assert error_after < 0.93 * error_before


def test_a_rectifier_cuts_the_ddim_inversion_reconstruction_error_of_its_sources(shapes_reconstruction):
    """The paper's Table 1 setting on the sources it was trained on: DDIM inversion then DDIM sampling, 10 steps."""
    unet, rectifier, _, _ = shapes_reconstruction
    sources = make_batch(HELD_OUT_SEED, 8).images
    settings = EditSettings(steps=10, cfg=1.0)  # the unconditional branch, as trained
    plain, rectified_error = (((ddim_reconstruction(denoiser, sources, None, settings) - sources) ** 2).mean().item()
                              for denoiser in (ShapesDenoiser(unet), RectifiedShapesDenoiser(unet, rectifier, sources)))
    print(f"shapes model, 10-step DDIM reconstruction MSE {plain:.4f} -> {rectified_error:.4f} "
          f"({rectified_error / plain:.2f})")
    # An untrained rectifier is the identity (ratio exactly 1). Measured after this training (200 steps on 8
    # sources) for source sets 0-7, 100-107 and 200-207 with seeds 0, 1, 2: ratios 0.80, 0.76 and 0.81.
    # 0.9 sits a tenth below a rectifier that does nothing and 0.09 above the worst measured.
    assert rectified_error < 0.9 * plain


# --- edit training --------------------------------------------------------------------------------


def tiny_edit_task(seed=2):
    """Sources, a frozen linear image embedding whose weights would take gradients, and per-source directions."""
    sources = blob_images(8, seed=3)
    embedding = nn.Linear(CHANNELS * SIZE * SIZE, 8)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(embedding.weight.shape, generator=torch.Generator().manual_seed(seed)))
    direction = torch.randn(len(sources), 8, generator=torch.Generator().manual_seed(seed + 1))
    targets = torch.arange(len(sources)) % CLASSES
    return sources, (lambda images: embedding(images.flatten(1))), embedding, direction, targets


def test_edit_training_reaches_only_the_rectifier_and_leaves_the_base_model_bit_for_bit():
    model = make_model()
    before = state_copy(model)
    rectifier = make_rectifier(model)
    initial = state_copy(rectifier)
    sources, embed, embedding, direction, targets = tiny_edit_task()
    embedding_before = state_copy(embedding)
    history = train_edit_rectifier(model, rectifier, sources, embed, direction, steps=5, lr=1e-3, alpha_bar=ALPHA_BAR,
                                   targets=targets, batch_size=4)
    assert len(history) == 5
    assert all(parameter.grad is None for parameter in model.parameters())
    assert all(parameter.grad is None for parameter in embedding.parameters())
    assert_untouched(model, before)
    for key, value in embedding.state_dict().items():
        assert torch.equal(value, embedding_before[key]), key
    assert any(not torch.equal(value, initial[key]) for key, value in rectifier.state_dict().items())


def test_edit_training_is_seeded_and_recorded_in_the_saved_file(tmp_path):
    def run(seed):
        model = make_model()
        rectifier = make_rectifier(model)
        sources, embed, _, direction, targets = tiny_edit_task()
        train_rectifier(model, rectifier, sources, steps=2, batch_size=4, seed=seed)
        history = train_edit_rectifier(model, rectifier, sources, embed, direction, steps=3, targets=targets,
                                       batch_size=4, seed=seed, direction_weight=2.0, l1_weight=0.5)
        return rectifier, history

    rectifier, history = run(4)
    assert history == run(4)[1] and history != run(5)[1]
    save_rectifier(rectifier, str(tmp_path / "edit.safetensors"))
    loaded = read_rectifier(str(tmp_path / "edit.safetensors"))
    assert [stage["objective"] for stage in loaded.training_runs] == ["noise fitting", "edit"]
    assert loaded.training_runs[1] == {"objective": "edit", "steps": 3, "lr": 1e-3, "batch_size": 4, "weight_decay": 0.0,
                                  "seed": 4, "direction_weight": 2.0, "l1_weight": 0.5, "trajectory": "source",
                                  "final_loss": history[-1]}
    assert loaded.origin == str(tmp_path / "edit.safetensors")


def test_the_edit_runs_under_the_target_condition():
    model, rectifier = make_model(), None
    rectifier = make_rectifier(model)
    sources, embed, _, direction, _ = tiny_edit_task()
    x0, t, noise = sources[:4], torch.tensor([100, 300, 500, 700]), torch.randn(4, CHANNELS, SIZE, SIZE)
    losses = {cond: edit_loss_terms(model, rectifier, x0, t, noise, ALPHA_BAR, embed, direction[:4],
                                    torch.full((4,), cond)) for cond in range(CLASSES)}
    # An untrained rectifier is the identity: x0_hat is the plain model's under each target, and differs by target.
    assert losses[0][1] != losses[1][1] != losses[2][1]
    x_t = noised(x0, noise, t, ALPHA_BAR)
    plain = predicted_x0(x_t, model(x_t, t, torch.full((4,), 2)), t, ALPHA_BAR)
    torch.testing.assert_close(losses[2][1], (plain - x0).abs().mean(), rtol=0, atol=1e-5)


def test_markovian_edit_training_takes_each_step_from_the_previous_edited_one():
    """The baseline's walk against the sigma-space DDIM the edits use, on an identity rectifier.

    A learning rate of 1e-30 keeps the rectifier the identity (AdamW moves a weight by about lr),
    so the estimates the losses see must be the plain model's along ``invert_ddim`` under the
    source condition, then Euler (DDIM) down under the target, at the same levels. Only float32
    rounding separates the two: the eps rounding (about 1e-7) times sigma up to 157 at the top
    level gives 1e-5 in an estimate; 1e-4 allows for the few steps it passes through, while
    inverting under the target, or stepping from the source's trajectory instead of the walk,
    moves the estimates by far more (checked below).
    """
    model = make_model()
    sources, embed, _, direction, _ = tiny_edit_task()
    source, source_condition, target = sources[:1], torch.tensor([0]), torch.tensor([2])
    timesteps = torch.linspace(999, 0, 5).round().long()
    levels = ((1 - ALPHA_BAR[timesteps]) / ALPHA_BAR[timesteps]).sqrt()

    def walk(**changes):
        seen = []

        def recording_embed(images):
            seen.append(images.detach().clone())
            return embed(images)

        train_edit_rectifier(model, make_rectifier(model), source, recording_embed, direction[:1], steps=4, lr=1e-30,
                             alpha_bar=ALPHA_BAR, targets=target, batch_size=1, trajectory="previous edit",
                             trajectory_steps=5, **changes)
        return torch.cat(seen[1:])  # the first call embeds the source itself

    def denoiser(x, sigma, cond):
        t = timesteps[(levels - sigma[0]).abs().argmin()].expand(len(x))
        return x - sigma[:, None, None, None] * model(x / (1 + sigma**2).sqrt()[:, None, None, None], t, cond)

    sigmas = torch.cat([levels, torch.zeros(1)])
    expected = []
    with torch.no_grad():
        sample_euler(lambda x, sigma: denoiser(x, sigma, target), invert_ddim(denoiser, source, sigmas, source_condition),
                     sigmas, callback=lambda step: expected.append(step["denoised"]))
    expected = torch.cat(expected[:4])
    torch.testing.assert_close(walk(source_conditions=source_condition), expected, rtol=0, atol=1e-4)
    assert (walk() - expected).abs().max() > 1e-2  # inverted under the target instead


def test_the_edit_learning_rate_decays_by_the_given_factor():
    model = make_model()
    sources, embed, _, direction, targets = tiny_edit_task()

    def weights_after(steps, **schedule):
        rectifier = make_rectifier(model)
        train_edit_rectifier(model, rectifier, sources, embed, direction, steps=steps, lr=1e-2, targets=targets,
                             batch_size=4, **schedule)
        return torch.cat([parameter.detach().flatten() for parameter in rectifier.parameters()]), rectifier
    # A decay of 1e-9 after the first step leaves AdamW steps of about 1e-11: three more barely move the weights,
    # against about 1e-2 each without it.
    once, _ = weights_after(1)
    decayed, rectifier = weights_after(4, lr_decay=1e-9, lr_decay_every=1)
    assert (decayed - once).abs().max() < 1e-8 < (weights_after(4)[0] - once).abs().max()
    assert rectifier.training_runs[-1]["lr_decay"] == 1e-9 and rectifier.training_runs[-1]["lr_decay_every"] == 1


def test_bad_edit_training_modes_are_refused_naming_the_input():
    model = make_model()
    sources, embed, _, direction, targets = tiny_edit_task()
    for changes, message in [({"trajectory": "markov"}, "trajectory must be one of"),
                             ({"trajectory_steps": 1}, "trajectory_steps must be at least 2"),
                             ({"source_conditions": targets[:3]}, "source_conditions has 3 rows for 8 sources"),
                             ({"lr_decay": 0.0}, "lr_decay must be positive"),
                             ({"lr_decay_every": 0}, "lr_decay_every must be at least 1")]:
        with pytest.raises(ValueError, match=message):
            train_edit_rectifier(model, make_rectifier(model), sources, embed, direction, steps=1, targets=targets,
                                 **{"trajectory": "previous edit", **changes})


@pytest.mark.parametrize("objective", ["noise fitting", "edit"])
def test_a_blow_up_stops_training_naming_the_learning_rate_and_leaves_nothing_to_save(objective, tmp_path):
    model = make_model()
    rectifier = make_rectifier(model)
    sources, embed, _, direction, targets = tiny_edit_task()
    saved = tmp_path / "never.safetensors"
    # AdamW moves each weight by about lr per step: 1e30 makes the second step's loss overflow.
    with pytest.raises(ValueError, match=r"is not finite at step \d+ of 20: the learning rate 1e\+30 is too high"):
        if objective == "edit":
            train_edit_rectifier(model, rectifier, sources, embed, direction, steps=20, lr=1e30, targets=targets,
                                 batch_size=4)
        else:
            train_rectifier(model, rectifier, sources, steps=20, lr=1e30, batch_size=4)
        save_rectifier(rectifier, str(saved))
    assert not saved.exists()


def test_a_non_finite_input_stops_training_at_the_first_step_naming_the_input():
    model = make_model()
    sources, embed, _, direction, targets = tiny_edit_task()
    with torch.no_grad():
        model.classes.weight[1] = float("nan")  # the model's prediction for condition 1 is NaN
    for train in (lambda rectifier: train_rectifier(model, rectifier, sources, steps=3, batch_size=4,
                                                    conditions=torch.ones(len(sources), dtype=torch.long)),
                  lambda rectifier: train_edit_rectifier(model, rectifier, sources, embed, direction, steps=3,
                                                         targets=torch.ones(len(sources), dtype=torch.long))):
        with pytest.raises(ValueError, match="not finite at the first step: the input .* holds NaN or inf"):
            train(make_rectifier(model))
    nan_direction = direction.clone()
    nan_direction[3, 0] = float("nan")
    with pytest.raises(ValueError, match="direction contains NaN or inf"):
        train_edit_rectifier(model, make_rectifier(model), sources, embed, nan_direction, steps=1, targets=targets)
    with pytest.raises(ValueError, match="direction is zero for source 2"):
        train_edit_rectifier(model, make_rectifier(model), sources, embed, direction * (torch.arange(8) != 2)[:, None],
                             steps=1, targets=targets)
    with pytest.raises(ValueError, match="embed gives image embeddings of width 8 but direction has width 5"):
        train_edit_rectifier(model, make_rectifier(model), sources, embed, direction[:, :5], steps=1, targets=targets)
    with pytest.raises(ValueError, match="targets has 3 rows for 8 sources"):
        train_edit_rectifier(model, make_rectifier(model), sources, embed, direction, steps=1, targets=targets[:3])


def test_non_finite_rectifiers_are_neither_saved_nor_read(trained, tmp_path):
    model, rectifier, _, _ = trained
    broken = make_rectifier(model)
    with torch.no_grad():
        broken.subnets[0].in_head.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"rectifier \(not saved to a file\) has NaN or inf weights in 1 of"):
        save_rectifier(broken, str(tmp_path / "broken.safetensors"))
    assert not (tmp_path / "broken.safetensors").exists()
    # A file written some other way is refused on reading, naming it.
    save_rectifier(rectifier, str(tmp_path / "good.safetensors"))
    state = {key: value.clone() for key, value in rectifier.state_dict().items()}
    state["subnets.0.in_head.bias"][0] = float("nan")
    with safe_open(str(tmp_path / "good.safetensors"), framework="pt") as file:
        metadata = file.metadata()
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"rectifier \(.*nan.safetensors\) has NaN or inf weights in 1 of .* "
                                         r"\(first subnets.0.in_head.bias\)"):
        read_rectifier(str(tmp_path / "nan.safetensors"))


def test_the_modulated_conv_computes_with_the_weights_the_host_gives():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x, in_factor, out_factor = torch.randn(2, 4, 5, 5), torch.randn(2, 1, 4, 3, 3), torch.randn(2, 6, 1, 3, 3)
    # A host that patches weights on the fly (a LoRA-like delta) and keeps the bias.
    delta = torch.randn(conv.weight.shape)
    patched = SeparableConvModulation(conv, weight_and_bias=lambda c, inp: (c.weight + delta, c.bias))
    reference = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        reference.weight.copy_(conv.weight + delta)
        reference.bias.copy_(conv.bias)
    torch.testing.assert_close(patched(x, in_factor, out_factor), SeparableConvModulation(reference)(x, in_factor, out_factor),
                               rtol=0, atol=1e-6)


# --- edit training on the shipped shapes model -------------------------------------------------------


def test_untrained_rectifier_leaves_the_shapes_denoiser_as_it_was():
    unet = load_model(ShapesUNet, UNET_FILE)
    batch = make_batch(HELD_OUT_SEED, 4, start=300)
    x = batch.images + 2.0 * torch.randn(batch.images.shape, generator=torch.Generator().manual_seed(0))
    rectified = RectifiedShapesDenoiser(unet, new_shapes_rectifier(unet), batch.images)
    plain = ShapesDenoiser(unet)
    for cond in (None, batch.labels):
        torch.testing.assert_close(rectified(x, 2.0, cond), plain(x, 2.0, cond), rtol=0, atol=1e-5)


def test_edit_training_on_the_shapes_model_aligns_edits_with_the_class_change_and_keeps_the_source(
        shapes_reconstruction):
    unet, reconstruction, _, _ = shapes_reconstruction
    classifier = load_classifier()
    embed, class_features = image_features(classifier), class_embeddings(classifier)
    training = make_batch(HELD_OUT_SEED, 16)
    targets = other_class(training.labels)
    held_out = make_batch(HELD_OUT_SEED, 24, start=300)
    held_out_targets = other_class(held_out.labels)
    t = torch.linspace(50, 950, 24).long()
    noise = torch.randn(held_out.images.shape, generator=torch.Generator().manual_seed(5))
    directions = edit_directions(class_features, held_out.labels, held_out_targets)

    def held_out_losses(rectifier):
        with torch.no_grad():
            return [term.item() for term in edit_loss_terms(unet, rectifier, held_out.images, t, noise, ALPHA_BAR, embed,
                                                            directions, held_out_targets)]

    start, recon_l1 = held_out_losses(reconstruction)
    rectifier = copy.deepcopy(reconstruction)
    # The paper's settings (both weights 1, no weight decay, from the reconstruction-trained rectifier) but for
    # lr 2e-3: at its 1e-3, 200 steps reach directional ratios of 0.843, 0.901 and 0.872 for seeds 0, 1, 2.
    train_edit_rectifier(unet, rectifier, training.images, embed,
                         edit_directions(class_features, training.labels, targets), steps=200, lr=2e-3,
                         alpha_bar=ALPHA_BAR, targets=targets, batch_size=8, seed=0)
    after, edit_l1 = held_out_losses(rectifier)
    print(f"shapes model, held out: directional loss {start:.4f} -> {after:.4f} ({after / start:.3f}); L1 to the "
          f"source under the target: reconstruction-trained {recon_l1:.4f}, edit-trained {edit_l1:.4f} "
          f"({edit_l1 / recon_l1:.3f})")
    # Measured for seeds 0, 1, 2: directional ratios 0.813, 0.820, 0.842 and L1 ratios 1.032, 0.982, 0.987: the
    # edit moves the estimate along the class change and keeps it as near the source as reconstruction does, within
    # the 6% allowed here.
    assert after < 0.9 * start
    assert edit_l1 < 1.06 * recon_l1
