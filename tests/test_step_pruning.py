"""Step-specific pruning finds step-dependent work where it was put, and only there."""
import copy

import pytest
import torch

from bvit.analysis.pruning import component_importance, component_labels, disabled
from bvit.models.factory import build_model
from bvit.peft import apply_peft, lora_modules

T, D, H = 3, 32, 4  # steps, width, heads (head_dim 8); MLP hidden 128
X = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
BATCHES = [(X[:32], Y[:32]), (X[32:], Y[32:])]


def tiny(arch: str = "bvit", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch=arch, width=D, steps=T, heads=H, patch_size=7, img_size=28, in_chans=1, num_classes=10,
                       **kw).eval()


def _manual_bvit(model, x, *, step: int, zero_cols: slice, target: str) -> torch.Tensor:
    """The bViT's forward written out, with `target`'s input columns `zero_cols` zeroed at `step` only."""
    pruned = copy.deepcopy(model.block)
    with torch.no_grad():
        pruned.get_submodule(target).weight[:, zero_cols] = 0
    h = model._pos_embed(model.patch_embed(x))
    for t in range(model.num_steps):
        h = (pruned if t == step else model.block)(h)
    return model.forward_head(model.norm(h))


@pytest.mark.parametrize(("component", "target", "cols"), [(1, "attn.proj", slice(8, 16)),
                                                          (H + 2, "mlp.fc2", slice(64, 96))])
def test_disabling_a_component_at_one_step_is_that_step_with_its_weights_removed(component, target, cols):
    model = tiny()
    with disabled(model, step=1, component=component, mlp_groups=4), torch.no_grad():
        hooked = model(X)
        hooked_again = model(X)  # the step counter restarts with every forward
    manual = _manual_bvit(model, X, step=1, zero_cols=cols, target=target)
    torch.testing.assert_close(hooked, manual, rtol=1e-5, atol=1e-6)
    assert torch.equal(hooked, hooked_again)
    assert not torch.allclose(hooked, model(X))  # the component mattered; outside the context all is restored
    assert torch.equal(model(X), tiny()(X))


def test_vit_layers_are_pruned_one_layer_at_a_time():
    model = tiny("vit")
    with disabled(model, step=2, component=0, mlp_groups=4), torch.no_grad():
        hooked = model(X)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.blocks[2].attn.proj.weight[:, 0:8] = 0
    torch.testing.assert_close(hooked, pruned(X), rtol=1e-5, atol=1e-6)


def test_matrix_finds_a_head_switched_off_at_exactly_one_step():
    """Per-step LoRA makes the shared block differ by step: at step 1 its adapter on attn.proj cancels head 0's
    slice of the projection, so head 0 does nothing at step 1 and something at every other step."""
    model = apply_peft(tiny(), method="lora-step", num_classes=10, rank=D // H, alpha=float(D // H))  # scaling 1
    proj = next(m for m in lora_modules(model) if m is model.block.attn.proj)
    with torch.no_grad():
        proj.base.weight[:, :8] *= 8  # make head 0 matter clearly wherever it is on
        proj.lora_A[1] = torch.eye(D)[:8]  # (rank 8, in 32): selects head 0's channels
        proj.lora_B[1] = -proj.base.weight[:, :8]  # (out 32, rank 8): cancels them at step 1 only
    result = component_importance(model, BATCHES, mlp_groups=4)
    loss = torch.tensor(result["loss_increase"])  # (T, H + 4)
    assert result["components"] == component_labels(model, mlp_groups=4) == [
        "head 0", "head 1", "head 2", "head 3", "mlp 0", "mlp 1", "mlp 2", "mlp 3"]
    assert loss.shape == (T, H + 4) and result["images"] == 64
    assert abs(loss[1, 0]) < 1e-5  # off at step 1: disabling it there changes nothing
    assert (loss[[0, 2], 0].abs() > 1e-3).all()  # on at steps 0 and 2
    assert (loss[1, 1:].abs() > 1e-6).all()  # everything else still works at step 1
    assert result["rank_correlation"][0][0] == pytest.approx(1.0)
    assert result["mean_rank_correlation"] < 1.0


def test_plain_bvit_matrix_has_every_step_and_component_and_a_baseline():
    model = tiny()
    result = component_importance(model, BATCHES)  # mlp groups default to the number of heads
    assert result["mlp_groups"] == H and len(result["top1_drop"]) == T and len(result["top1_drop"][0]) == 2 * H
    assert result["baseline"]["test_loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(model(X), Y).item(), rel=1e-6)
    rho = result["rank_correlation"]
    assert all(rho[i][j] == pytest.approx(rho[j][i]) for i in range(T) for j in range(T) if rho[i][j] is not None)


@pytest.mark.parametrize("k", range(T))
def test_skipping_any_single_step_of_a_bvit_without_step_embeddings_is_running_one_step_fewer(k):
    model = tiny()
    with torch.no_grad():
        assert torch.equal(model(X, skip_steps={k}), model(X, num_steps=T - 1))


def test_with_step_embeddings_whole_step_skips_differ():
    model = tiny(step_embed="learned")
    with torch.no_grad():
        model.step_embed.normal_()
        assert not torch.allclose(model(X, skip_steps={0}), model(X, skip_steps={T - 1}))


def test_bad_step_or_component_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"step must lie in \[0, 3\), got 3"):
        with disabled(model, step=T, component=0, mlp_groups=4):
            pass
    with pytest.raises(ValueError, match="128 MLP hidden units do not split into 5 equal groups"):
        with disabled(model, step=0, component=0, mlp_groups=5):
            pass
