"""The model core: parameter counts, weight-tying equivalence with timm's ViT, FLOPs, anytime steps; the relaxed
bViT (rbvit): bViT at r = 0 and at initialisation, a ViT of per-step merged blocks, anytime and skipping."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import bvit.models  # noqa: F401  (registers bvit_* with timm)
from bvit.models import BViT, RBViT, build_model, count_flops, count_params
from bvit.models.lora import LoRALinear

SMALL = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, num_heads=4)


def tied_vit(model: BViT, depth: int) -> VisionTransformer:
    """A timm ViT of `depth` blocks, every block loaded with the bViT's shared block."""
    vit = VisionTransformer(
        img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size,
        in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes,
        embed_dim=model.embed_dim, depth=depth, num_heads=model.block.attn.num_heads,
        global_pool=model.global_pool, class_token=model.cls_token is not None,
    )
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("block.")}
    for i in range(depth):
        sd.update({f"blocks.{i}.{k}": v for k, v in model.block.state_dict().items()})
    missing, unexpected = vit.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return vit


def test_bvit_base_param_count_matches_paper():
    bvit_b = timm.create_model("bvit_base_patch16_224")
    vit_b = timm.create_model("vit_base_patch16_224")
    assert count_params(bvit_b) == 8_601_064
    assert count_params(vit_b) == 86_567_656
    assert round(count_params(bvit_b) / count_params(vit_b), 4) == 0.0994


@pytest.mark.parametrize("name,expected", [
    ("bvit_tiny_patch16_224", 823_912), ("bvit_small_patch16_224", 2_531_560), ("bvit_large_patch16_224", 14_613_480),
])
def test_registered_param_counts_equal_one_block_vits(name, expected):
    assert count_params(timm.create_model(name)) == expected


@pytest.mark.parametrize("steps", [1, 3, 12])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_weight_tied_vit_gives_same_logits_and_summed_grads(steps, pool):
    torch.manual_seed(0)
    model = BViT(num_steps=steps, global_pool=pool, class_token=pool == "token", **SMALL)
    vit = tied_vit(model, steps)
    x = torch.randn(4, 1, 28, 28)
    out_b, out_v = model(x), vit(x)
    assert (out_b - out_v).abs().max().item() <= 1e-5
    out_b.square().sum().backward()
    out_v.square().sum().backward()
    for name, p in model.block.named_parameters():
        summed = sum(vit.blocks[i].get_parameter(name).grad for i in range(steps))
        torch.testing.assert_close(p.grad, summed, rtol=1e-4, atol=1e-6, msg=f"grad of block.{name}")


@pytest.mark.parametrize("width,steps,heads", [(64, 4, 4), (192, 12, 3), (96, 2, 2)])
def test_flops_bvit_equal_vit_same_width_and_steps(width, steps, heads):
    kw = dict(width=width, steps=steps, heads=heads, patch_size=4, img_size=28, in_chans=1, num_classes=10)
    fb = count_flops(build_model(arch="bvit", **kw), 28, 1)
    fv = count_flops(build_model(arch="vit", **kw), 28, 1)
    assert fb > 0 and abs(fb - fv) / fv <= 0.01


def test_flops_count_attention_and_scale_with_steps():
    kw = dict(width=64, heads=4, patch_size=4, img_size=28, in_chans=1, num_classes=10)
    f1 = count_flops(build_model(arch="bvit", steps=1, **kw), 28, 1)
    f5 = count_flops(build_model(arch="bvit", steps=5, **kw), 28, 1)
    n, d = 50, 64  # 49 patches + class token
    per_block = 2 * n * (d * 3 * d + d * d + 2 * d * 4 * d) + 2 * 2 * n * n * d  # linears + QK^T and AV
    assert f5 - f1 == 4 * per_block


def test_num_steps_k_equals_stopping_after_k():
    torch.manual_seed(0)
    model = BViT(num_steps=6, **SMALL).eval()
    x = torch.randn(2, 1, 28, 28)
    _, states = model.forward_features(x, return_states=True)
    assert len(states) == 7
    for k in (0, 1, 3, 6, 9):
        expected = model.forward_head(model.norm(states[k])) if k <= 6 else None
        out = model(x, num_steps=k)
        if expected is not None:
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # running 9 steps is 6 trained steps plus 3 more applications of the same block
    h = states[6]
    for _ in range(3):
        h = model.block(h)
    torch.testing.assert_close(model(x, num_steps=9), model.forward_head(model.norm(h)), rtol=0, atol=1e-6)


def test_skip_steps_none_is_normal_forward_and_skip_changes_output():
    torch.manual_seed(0)
    model = BViT(num_steps=4, **SMALL).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x, skip_steps=()), model(x))
    skipped, states = model.forward_features(x, skip_steps={1}, return_states=True)
    assert torch.equal(states[2], states[1])
    assert not torch.allclose(model(x, skip_steps={1}), model(x))
    assert torch.equal(model(x, skip_steps=range(4)), model(x, num_steps=0))


def test_step_embed_learned_is_used_and_counted():
    torch.manual_seed(0)
    plain = BViT(num_steps=3, **SMALL)
    emb = BViT(num_steps=3, step_embed="learned", **SMALL)
    assert count_params(emb) - count_params(plain) == 3 * 64
    emb.load_state_dict({**plain.state_dict(), "step_embed": torch.zeros(3, 1, 64)})
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(emb(x), plain(x))  # zero step embeddings change nothing
    with torch.no_grad():
        emb.step_embed[1].fill_(0.5)
    assert not torch.allclose(emb(x), plain(x))
    assert "step_embed" in emb.no_weight_decay()


@pytest.mark.parametrize("arch", ["bvit", "rbvit"])
def test_grad_checkpointing_gives_same_gradients(arch):
    """rbvit: the recomputation in the backward pass runs each step with its own delta."""
    torch.manual_seed(0)
    a = BViT(num_steps=5, step_embed="learned", **SMALL) if arch == "bvit" else _relaxed(5, step_embed="learned")
    a.train()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x = torch.randn(3, 1, 28, 28)
    a(x).logsumexp(-1).sum().backward()
    b(x).logsumexp(-1).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.grad is not None, n
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_timm_conventions():
    model = timm.create_model("bvit_tiny_patch4_28", embed_dim=96, num_steps=8, num_heads=3)
    assert (model.embed_dim, model.num_steps, model.num_features) == (96, 8, 96)
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert model.get_classifier() is model.head
    model.reset_classifier(5)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    assert model.forward_head(model.forward_features(torch.randn(2, 1, 28, 28)), pre_logits=True).shape == (2, 96)
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        timm.create_model("bvit_tiny_patch4_28", pretrained=True)


def test_bad_hyperparameters_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        BViT(embed_dim=100, num_heads=6)
    with pytest.raises(ValueError, match="step_embed applies to arch 'bvit' or 'rbvit' only, not 'vit'"):
        build_model(arch="vit", step_embed="learned")
    with pytest.raises(ValueError, match="unknown arch 'resnet'; registered: bvit, rbvit, vit"):
        build_model(arch="resnet")
    with pytest.raises(ValueError, match="relax_rank must be >= 0"):
        RBViT(relax_rank=-1)


REGISTERED = timm.list_models("bvit_*")


def test_every_bvit_variant_is_registered():
    """Guards the parametrization below: an empty list would silently test nothing."""
    assert len(REGISTERED) == 8 and {"bvit_base_patch16_224", "bvit_tiny_patch4_28"} <= set(REGISTERED)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_bvit_forward_backward(name):
    cfg = timm.models.get_pretrained_cfg(name)
    c, h, w = cfg.input_size
    # Shrink the big ones so the test stays fast; depth and patching stay as registered.
    kwargs = dict(embed_dim=64, num_heads=4) if h >= 224 else {}
    model = timm.create_model(name, **kwargs)
    x = torch.randn(2, c, h, w)
    out = model(x)
    assert out.shape == (2, cfg.num_classes)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# --- rbViT: relaxed recursion ---------------------------------------------------------------------------

RELAXED = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def test_rbvit_rank_0_is_bvit():
    torch.manual_seed(0)
    plain = BViT(num_steps=4, **SMALL)
    torch.manual_seed(0)
    relaxed = RBViT(num_steps=4, relax_rank=0, **SMALL)
    assert relaxed.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, relaxed.state_dict()[k]) for k, v in plain.state_dict().items())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(relaxed(x), plain(x))


def test_rbvit_at_initialisation_computes_its_bvit():
    """The deltas start at zero (B = 0), on the base weights a bViT of the same seed has: the same logits."""
    torch.manual_seed(0)
    plain = BViT(num_steps=4, **SMALL).eval()
    torch.manual_seed(0)
    relaxed = RBViT(num_steps=4, relax_rank=8, **SMALL).eval()
    for name in RELAXED:
        m = relaxed.block.get_submodule(name)
        assert isinstance(m, LoRALinear) and m.lora_A.shape[:2] == (4, 8) and not m.lora_B.any()
        assert torch.equal(m.base.weight, plain.block.get_submodule(name).weight)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(relaxed(x), plain(x))
    assert all(p.requires_grad for p in relaxed.parameters())  # trained from scratch: base and deltas


def _relaxed(steps: int = 4, rank: int = 2, **kw) -> RBViT:
    torch.manual_seed(0)
    model = RBViT(num_steps=steps, relax_rank=rank, **SMALL, **kw).eval()
    with torch.no_grad():
        for name in RELAXED:
            model.block.get_submodule(name).lora_B.normal_(std=0.05)  # trained deltas: each step its own
    return model


def _merged_block(model: RBViT, t: int) -> torch.nn.Module:
    """Step t's block with its delta folded into the weights: W + B_t A_t."""
    block = copy.deepcopy(model.block)
    for name in RELAXED:
        parent, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(parent), leaf, model.block.get_submodule(name).merged(t))
    return block


@pytest.mark.parametrize("steps", [1, 4])
def test_rbvit_is_a_vit_of_its_per_step_merged_blocks(steps):
    """Relaxed recursion is a ViT whose block t is W + B_t A_t: same logits as that timm ViT."""
    model = _relaxed(steps)
    vit = tied_vit(BViT(num_steps=steps, **SMALL), steps)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("block.")}
    for t in range(steps):
        sd.update({f"blocks.{t}.{k}": v for k, v in _merged_block(model, t).state_dict().items()})
    vit.load_state_dict(sd)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model(x), vit.eval()(x), rtol=0, atol=1e-5)


def test_rbvit_anytime_steps_past_t_reuse_the_last_delta_and_skipping_skips_a_steps_delta():
    model = _relaxed(4)
    x = torch.randn(2, 1, 28, 28)
    _, states = model.forward_features(x, return_states=True)
    last = _merged_block(model, 3)
    h = states[4]
    for _ in range(2):
        h = last(h)
    torch.testing.assert_close(model(x, num_steps=6), model.forward_head(model.norm(h)), rtol=0, atol=1e-5)
    _, skipped = model.forward_features(x, skip_steps={1}, return_states=True)
    assert torch.equal(skipped[2], skipped[1])
    torch.testing.assert_close(skipped[3], _merged_block(model, 2)(skipped[2]), rtol=0, atol=1e-5)  # delta 2, not 1
    assert torch.equal(model(x, num_steps=2), model.forward_head(model.norm(states[2])))


def test_rbvit_checkpoint_round_trips_as_data(tmp_path):
    """A trained rbvit's checkpoint.pt loads with weights_only=True into the model its config describes."""
    from bvit.checkpoint import load_trained
    from bvit.config import TrialConfig

    cfg = TrialConfig.model_validate({"model": {"arch": "rbvit", "width": 64, "heads": 4, "steps": 4,
                                                "relax_rank": 2}})
    model = _relaxed(4)
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json")}, tmp_path / "checkpoint.pt")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["model"]["relax_rank"] == 2
    loaded, loaded_cfg = load_trained(tmp_path)
    assert isinstance(loaded, RBViT) and loaded_cfg == cfg
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
