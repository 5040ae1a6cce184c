"""bViT as a first-class timm model: TorchScript, torch.fx, the feature API, parameter groups, pretrained
configs, and checkpoints that travel both ways (bvit-sweep <-> timm, bViT <-> timm ViT).

timm's own `tests/test_models.py` is run against the bvit_* models outside this repository (README,
"The model"); these are the project's own assertions on the same abilities.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm import set_scriptable
from timm.models import create_feature_extractor, get_graph_node_names, group_parameters
from typer.testing import CliRunner

import bvit.models  # noqa: F401  (registers bvit_* with timm)
from bvit.checkpoint import load_trained
from bvit.config import TrialConfig
from bvit.models import RBViT, build_model
from bvit.models.bvit import (
    BViT,
    bvit_to_vit_state_dict,
    checkpoint_filter_fn,
    export_tied_vit,
    tied_vit_args,
    vit_to_bvit_state_dict,
)
from orchestrator.cli import app

NAMES = timm.list_models("bvit_*")
RELAXED_NAMES = timm.list_models("rbvit_*")
SMALL = dict(embed_dim=32, num_heads=2, num_steps=4)  # every variant keeps its patching, channels and classes


def _make(name: str, scriptable: bool = False, **kwargs) -> BViT:
    """A seeded small variant; an rbvit's per-step deltas (zero at initialisation) set as if trained."""
    torch.manual_seed(0)
    with set_scriptable(scriptable):
        model = timm.create_model(name, **{**SMALL, **kwargs})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)
    return model


def _input(model: BViT, batch: int = 2) -> torch.Tensor:
    c, h, w = model.pretrained_cfg["input_size"]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(1))


def _run_fresh(code: str) -> str:
    """Run `code` in a fresh Python process (nothing from this one carries over) and return its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


# --- TorchScript and torch.fx ----------------------------------------------------------------------------

def test_every_relaxed_variant_mirrors_a_bvit_variant():
    """Guards the parametrizations over RELAXED_NAMES: each bvit_* has its rbvit_*."""
    assert RELAXED_NAMES == [f"r{n}" for n in NAMES] and len(NAMES) == 8


@pytest.mark.parametrize("name", NAMES + RELAXED_NAMES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torchscript_logits_equal_eager(name, mode):
    model = _make(name, scriptable=True, step_embed="learned").train(mode == "train")
    scripted = torch.jit.script(model)
    x = _input(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-6)
    # anytime and step-skipping go through the scripted forward too (a list of steps)
    torch.testing.assert_close(scripted(x, 6, [1]), model(x, num_steps=6, skip_steps={1}), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES + RELAXED_NAMES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fx_trace_logits_equal_eager_and_script(name, mode):
    model = _make(name, step_embed="learned").train(mode == "train")
    x = _input(model)
    traced = torch.fx.symbolic_trace(model)  # no concrete_args: traces the default T steps
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.jit.script(traced)(x), model(x), rtol=0, atol=1e-6)
    # eager anytime / skipping still work on the module that was traced
    assert not torch.allclose(model(x, num_steps=6), model(x))
    assert not torch.allclose(model(x, skip_steps={0}), model(x))


def test_fx_feature_extractor_taps_each_step():
    model = _make("bvit_tiny_patch4_28").eval()
    x = _input(model)
    _, eval_nodes = get_graph_node_names(model)
    # the block runs once per step, each run ends in its second residual add: block.add_1, block.add_3, ...
    step_outputs = [n for n in eval_nodes if n.startswith("block.add")][1::2]
    assert len(step_outputs) == model.num_steps
    extractor = create_feature_extractor(model, return_nodes={n: f"step{t}" for t, n in enumerate(step_outputs)})
    taps = extractor(x)
    _, states = model.forward_features(x, return_states=True)
    for t in range(model.num_steps):
        torch.testing.assert_close(taps[f"step{t}"], states[t + 1], rtol=0, atol=0)


# --- timm's feature API: an intermediate is a step's hidden state ----------------------------------------

def test_forward_intermediates_are_the_step_states():
    model = _make("bvit_tiny_patch4_28", num_steps=5).eval()
    x = _input(model, 3)
    features, states = model.forward_features(x, return_states=True)  # [h0, h1, ..., h5], (B, 1 + 49, D)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    assert len(inter) == len(model.feature_info) == 5
    for t, y in enumerate(inter):
        assert y.shape == (3, 32, 7, 7)  # NCHW: patch tokens on the 7x7 grid
        torch.testing.assert_close(y, states[t + 1][:, 1:].transpose(1, 2).reshape(3, 32, 7, 7), rtol=0, atol=0)
    nlc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", norm=True, intermediates_only=True)
    assert [y.shape for y in nlc] == [(3, 49, 32)] * 2
    torch.testing.assert_close(nlc[1], model.norm(states[5])[:, 1:], rtol=0, atol=0)
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(last2[0], inter[3], rtol=0, atol=0)
    with_cls = model.forward_intermediates(x, indices=[1], output_fmt="NLC", return_prefix_tokens=True,
                                           intermediates_only=True)
    torch.testing.assert_close(with_cls[0][1], states[2][:, :1], rtol=0, atol=0)
    stopped, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(stopped, model.norm(states[2]), rtol=0, atol=0)
    # anytime: the steps actually run are the levels
    _, more = model.forward_intermediates(x, num_steps=8, output_fmt="NLC")
    _, states8 = model.forward_features(x, num_steps=8, return_states=True)
    assert len(more) == 8
    torch.testing.assert_close(more[7], states8[8][:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[5])


def test_features_only_gives_the_last_steps_and_scripts():
    model = _make("bvit_tiny_patch4_32", features_only=True, out_indices=(0, 2, 3)).eval()
    ref = _make("bvit_tiny_patch4_32").eval()
    x = _input(ref)
    assert model.feature_info.channels() == [32, 32, 32]
    assert model.feature_info.reduction() == [4, 4, 4]
    feats = model(x)
    expected = ref.forward_intermediates(x, indices=[0, 2, 3], intermediates_only=True)
    for f, e in zip(feats, expected, strict=True):
        assert f.shape == (2, 32, 8, 8)
        torch.testing.assert_close(f, e, rtol=0, atol=0)
    for f, e in zip(torch.jit.script(model)(x), feats, strict=True):
        torch.testing.assert_close(f, e, rtol=0, atol=1e-6)
    default = _make("bvit_small_patch4_28", features_only=True)
    assert len(default.feature_info.channels()) == 3  # timm ViT's default: the last 3 levels


def test_prune_intermediate_layers_runs_only_the_steps_needed():
    model = _make("bvit_tiny_patch4_28", num_steps=6).eval()
    x = _input(model)
    taps = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([1, 3])
    assert kept == [1, 3] and model.num_steps == 4 and len(model.feature_info) == 4
    pruned = model.forward_intermediates(x, indices=kept, intermediates_only=True)
    torch.testing.assert_close(pruned[1], taps[3], rtol=0, atol=0)
    assert model(x).shape == (2, 50, 32)  # head pruned: unpooled tokens, as timm's ViT


# --- Parameter groups and pretrained configs ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, dict(step_embed="learned", global_pool="avg", class_token=False)])
def test_group_matcher_covers_every_parameter_and_orders_layer_decay(kwargs):
    from timm.optim import create_optimizer_v2

    model = _make("bvit_tiny_patch4_28", **kwargs)
    names = [n for n, _ in model.named_parameters()]
    layer_of = group_parameters(model, model.group_matcher(), reverse=True)
    assert sorted(layer_of) == sorted(names)
    # embeddings < the shared block (with step embeddings and final norm, as a ViT's last block) < head
    assert layer_of["patch_embed.proj.weight"] == layer_of["pos_embed"] == 0
    assert {layer_of[n] for n in names if n.startswith(("block.", "step_embed", "norm."))} == {1}
    assert {layer_of[n] for n in names if n.startswith(("head.", "fc_norm."))} == {2}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(names) and {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    scale = {n: g["lr_scale"] for g in opt.param_groups for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert scale["pos_embed"] == 0.25 and scale["block.attn.qkv.weight"] == 0.5 and scale["head.weight"] == 1.0


@pytest.mark.parametrize("name", NAMES + RELAXED_NAMES)
def test_default_cfgs_are_complete_and_match_the_model(name):
    model = timm.create_model(name, device="meta")
    cfg = model.pretrained_cfg
    c, h, w = cfg["input_size"]
    assert (model.in_chans, tuple(model.patch_embed.img_size), model.num_classes) == (c, (h, w), cfg["num_classes"])
    assert len(cfg["mean"]) == len(cfg["std"]) == c
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert cfg["fixed_input_size"] and cfg["interpolation"] and 0 < cfg["crop_pct"] <= 1
    assert all(p.device.type == "meta" for p in model.parameters())  # timm's factory device kwarg


# --- Checkpoints: bvit-sweep training -> timm.create_model, in a fresh process ----------------------------

def test_training_checkpoint_loads_with_create_model_in_a_fresh_process(fmnist_dir, tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(app, [
        "train", "--set", f"data.path={fmnist_dir}", "--set", "model.width=16", "--set", "model.heads=2",
        "--set", "model.steps=3", "--set", "model.step_embed=learned", "--set", "data.train_subset=64",
        "--set", "data.batch_size=32", "--set", "data.num_workers=1", "--set", "optim.epochs=2",
        "--checkpoint-dir", str(run), "--json"])
    assert r.exit_code == 0, r.output
    trained, _ = load_trained(run / "checkpoint.pt")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    # The variant's defaults (width 192, 12 steps, no step embedding) give way to the checkpoint's own.
    out = _run_fresh(f"""
        import torch, timm, bvit.models
        m = timm.create_model("bvit_tiny_patch4_28", pretrained=True,
                              pretrained_cfg_overlay=dict(file="{run / 'checkpoint.pt'}")).eval()
        with torch.no_grad():
            torch.save(m(torch.load("{tmp_path / 'x.pt'}")), "{tmp_path / 'logits.pt'}")
        print(m.embed_dim, m.num_steps, m.step_embed is not None)
    """)
    assert out.split() == ["16", "3", "True"]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), trained(x))


@pytest.mark.parametrize("arch", ["bvit", "vit"])
def test_training_checkpoint_sets_the_architecture_and_features_only_follows(tmp_path, arch):
    cfg = TrialConfig.model_validate({"model": {"arch": arch, "width": 16, "steps": 2, "heads": 2}})
    torch.manual_seed(0)
    trained = build_model(arch=arch, width=16, steps=2, heads=2, patch_size=4, img_size=28, in_chans=1,
                          num_classes=10).eval()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": trained.state_dict(), "config": cfg.model_dump(mode="json"), "epoch": 1}, path)
    overlay = dict(file=str(path))
    model = timm.create_model("bvit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
                              vit_block=-1).eval()
    assert (model.embed_dim, model.num_steps, model.in_chans, model.num_classes) == (16, 2, 1, 10)
    x = torch.randn(2, 1, 28, 28)
    if arch == "bvit":
        assert torch.equal(model(x), trained(x))
    else:  # the ViT arm of a sweep: its last block becomes the shared one
        assert torch.equal(model.block.attn.qkv.weight, trained.blocks[-1].attn.qkv.weight)
    features = timm.create_model("bvit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
                                 features_only=True, vit_block=-1).eval()
    assert features.feature_info.channels() == [16, 16]  # both steps (at most the last 3)
    torch.testing.assert_close(features(x), model.forward_intermediates(x, intermediates_only=True), rtol=0, atol=0)


def test_hostile_file_is_refused_by_create_model(tmp_path):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to load"):
        timm.create_model("bvit_tiny_patch4_28", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "evil.pt")))
    assert not marker.exists()


def test_pretrained_without_weights_says_how_to_load_a_file():
    with pytest.raises(RuntimeError, match="no pretrained weights.*pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("bvit_tiny_patch4_28", pretrained=True)


# --- Checkpoints: bViT -> weight-tied timm ViT, loaded by plain timm --------------------------------------

@pytest.mark.parametrize("pool", ["token", "avg"])
def test_export_tied_vit_loads_in_plain_timm_with_identical_logits(tmp_path, pool):
    model = _make("bvit_tiny_patch4_28", global_pool=pool, class_token=pool == "token").eval()
    args = export_tied_vit(model, tmp_path / "vit.pth")
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "args.json").write_text(json.dumps(args))
    # No bvit import: plain timm reads the file with its own create_model.
    _run_fresh(f"""
        import json, sys, torch, timm
        vit = timm.create_model(**json.load(open("{tmp_path / 'args.json'}"))).eval()
        assert type(vit).__name__ == "VisionTransformer" and len(vit.blocks) == 4
        assert not any(m.startswith("bvit") for m in sys.modules)
        with torch.no_grad():
            torch.save(vit(torch.load("{tmp_path / 'x.pt'}")), "{tmp_path / 'logits.pt'}")
    """)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(x))


def test_tied_state_dict_round_trips_and_refuses_step_embeddings():
    model = _make("bvit_tiny_patch4_28").eval()
    vit = timm.models.VisionTransformer(**tied_vit_args(model, depth=6)).eval()
    vit.load_state_dict(bvit_to_vit_state_dict(model.state_dict(), depth=6))
    x = _input(model)
    torch.testing.assert_close(vit(x), model(x, num_steps=6), rtol=0, atol=1e-5)
    back = BViT(img_size=28, patch_size=4, in_chans=1, num_classes=10, **SMALL)
    back.load_state_dict(vit_to_bvit_state_dict(vit.state_dict(), vit_block=3))
    assert torch.equal(back(x), model(x))
    with pytest.raises(ValueError, match="step embeddings"):
        export_tied_vit(_make("bvit_tiny_patch4_28", step_embed="learned"), "unused.pth")


# --- Checkpoints: a timm ViT -> bViT by a chosen rule -----------------------------------------------------

@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", embed_dim=32, num_heads=2, depth=4).eval()
    path = tmp_path_factory.mktemp("vit") / "vit.pth"
    torch.save(vit.state_dict(), path)
    return vit, path


@pytest.mark.parametrize("vit_block", [0, -1, "2", "mean"])
def test_vit_weights_load_into_bvit_by_the_chosen_rule(vit_file, vit_block):
    vit, path = vit_file
    model = timm.create_model("bvit_tiny_patch16_224", embed_dim=32, num_heads=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), vit_block=vit_block)
    got = model.block.state_dict()
    if vit_block == "mean":
        for name, v in got.items():
            mean = torch.stack([vit.blocks[i].state_dict()[name] for i in range(4)]).mean(dim=0)
            torch.testing.assert_close(v, mean, rtol=0, atol=1e-7)
    else:
        want = vit.blocks[int(vit_block)].state_dict()
        assert all(torch.equal(got[n], want[n]) for n in want)
    for name in ("pos_embed", "cls_token", "patch_embed.proj.weight", "norm.weight", "head.weight"):
        assert torch.equal(model.get_parameter(name), vit.get_parameter(name)), name
    if vit_block == 0:  # step 1 of the bViT is the ViT's first layer
        x = torch.randn(1, 3, 224, 224)
        _, states = model.forward_features(x, num_steps=1, return_states=True)
        torch.testing.assert_close(states[1], vit.blocks[0](vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))))


def test_vit_weights_adapt_to_another_input_and_head(vit_file):
    # ImageNet-shaped ViT (224 px, patch 16, 3 channels, 1000 classes) -> Fashion-MNIST bViT (28 px, patch 4,
    # 1 channel, 10 classes): patch and position embeddings are resampled, RGB summed, the head is new.
    vit, path = vit_file
    model = timm.create_model("bvit_tiny_patch4_28", embed_dim=32, num_heads=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.patch_embed.proj.weight.shape == (32, 1, 4, 4) and model.pos_embed.shape == (1, 50, 32)
    assert torch.equal(model.block.attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bad_vit_block_is_a_clear_error(vit_file):
    _, path = vit_file
    sd = torch.load(path)
    with pytest.raises(ValueError, match=r"vit_block must be a block index in \[-4, 4\) or 'mean'"):
        vit_to_bvit_state_dict(sd, vit_block=4)
    with pytest.raises(ValueError, match="no 'blocks"):
        vit_to_bvit_state_dict({"pos_embed": torch.zeros(1)})
    model = _make("bvit_tiny_patch16_224")
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


# --- rbViT: relaxed recursion as a timm model -------------------------------------------------------------

def test_create_model_builds_rbvit_with_the_registry_count():
    from bvit.archs import get_arch
    from bvit.config import ModelConfig

    model = timm.create_model("rbvit_tiny_patch4_28")
    assert isinstance(model, RBViT) and (model.embed_dim, model.num_steps, model.relax_rank) == (192, 12, 8)
    m = ModelConfig(arch="rbvit", width=192, steps=12, heads=3, relax_rank=8)
    assert sum(p.numel() for p in model.parameters()) == get_arch("rbvit").counts(m)[0] == 755_146
    assert timm.create_model("rbvit_tiny_patch4_28", relax_rank=2).relax_rank == 2


def _training_checkpoint(tmp_path, arch: str, **model) -> tuple[torch.nn.Module, dict]:
    cfg = TrialConfig.model_validate({"model": {"arch": arch, "width": 16, "steps": 3, "heads": 2, **model}})
    torch.manual_seed(0)
    trained = build_model(**cfg.model.model_dump()).eval()
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)
    torch.save({"model": trained.state_dict(), "config": cfg.model_dump(mode="json"), "epoch": 1},
               tmp_path / "checkpoint.pt")
    return trained, dict(file=str(tmp_path / "checkpoint.pt"))


def test_rbvit_training_checkpoint_loads_with_create_model_and_bvit_refuses_it(tmp_path):
    trained, overlay = _training_checkpoint(tmp_path, "rbvit", relax_rank=2)
    model = timm.create_model("rbvit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    assert (model.embed_dim, model.num_steps, model.relax_rank, model.in_chans) == (16, 3, 2, 1)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), trained(x))
    with pytest.raises(ValueError, match="relaxed bViT .* load it with the rbvit_\\* model"):
        timm.create_model("bvit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay)


def test_a_bvit_checkpoint_starts_an_rbvit_at_exactly_that_bvit(tmp_path):
    trained, overlay = _training_checkpoint(tmp_path, "bvit")
    model = timm.create_model("rbvit_tiny_patch4_28", pretrained=True, pretrained_cfg_overlay=overlay,
                              relax_rank=4).eval()
    assert model.relax_rank == 4 and not model.block.attn.qkv.lora_B.any()  # the deltas start at zero
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), trained(x))
