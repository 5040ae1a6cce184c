"""The architecture registry (bvit/archs.py): every registered arch builds, its closed-form counts are the built
model's, an unknown arch lists the registered ones, committed trial ids stand, and no code outside the registry
and the model files branches on an arch's name."""
import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from bvit.archs import ARCH_OPTIONS, ARCHS, get_arch
from bvit.config import ModelConfig, TrialConfig
from bvit.models import count_flops, count_params
from bvit.models.factory import build_from_config
from orchestrator.planning import model_flops, model_params

ROOT = Path(__file__).resolve().parents[1]


def test_the_registry_holds_the_three_archs():
    """Guards the parametrizations below: an empty registry would silently test nothing."""
    assert set(ARCHS) == {"bvit", "rbvit", "vit"}
    assert ARCH_OPTIONS == {"step_embed", "relax_rank"}
    assert {a.baseline for a in ARCHS.values()} == {None, "vit"}
    assert all(a.baseline is None or a.baseline in ARCHS for a in ARCHS.values())


SHAPES = [
    dict(width=32, steps=3, heads=2),
    dict(width=48, steps=1, heads=4, mlp_ratio=2.5, global_pool="avg"),
    dict(width=64, steps=4, heads=4, patch_size=7, in_chans=3, num_classes=5, img_size=28),
    dict(width=16, steps=5, heads=2, img_size=32, patch_size=8, step_embed="learned"),
]


def _configs():
    for arch in ARCHS.values():
        for shape in SHAPES:
            extra = [{}] if "relax_rank" not in arch.options else [dict(relax_rank=r) for r in (0, 2, 8)]
            for e in extra:
                if "step_embed" in shape and "step_embed" not in arch.options:
                    continue
                yield ModelConfig(arch=arch.name, **shape, **e)


CONFIGS = list(_configs())


def test_every_registered_arch_is_counted():
    assert {m.arch for m in CONFIGS} == set(ARCHS) and len(CONFIGS) == 19


@pytest.mark.parametrize("m", CONFIGS, ids=lambda m: f"{m.arch}-w{m.width}-T{m.steps}-r{m.relax_rank}-{m.step_embed}")
def test_closed_form_counts_are_the_built_models(m):
    """The planner's numbers (orchestrator.planning, from each registry entry) are the model's own."""
    model = build_from_config(m)
    assert model_params(m) == count_params(model)
    assert model_flops(m) == count_flops(model, m.img_size, m.in_chans)


def test_rbvit_params_are_bvit_plus_t_deltas_of_rank_r():
    """params = bViT params + T * sum over the relaxed Linears of r * (in + out)."""
    d, h, T = 64, 256, 4
    linears = [(d, 3 * d), (d, d), (d, h), (h, d)]  # attn.qkv, attn.proj, mlp.fc1, mlp.fc2
    bvit = count_params(build_from_config(ModelConfig(arch="bvit", width=d, steps=T, heads=4)))
    assert bvit == 55_114  # results/width: bViT width 64
    for r in (0, 2, 8):
        rbvit = count_params(build_from_config(ModelConfig(arch="rbvit", width=d, steps=T, heads=4, relax_rank=r)))
        assert rbvit == bvit + T * sum(r * (i + o) for i, o in linears)
    assert count_params(build_from_config(ModelConfig(arch="rbvit", width=d, steps=T, heads=4, relax_rank=8))) == 87_882


def test_unknown_arch_lists_the_registered_ones():
    with pytest.raises(ValidationError, match=r"unknown arch 'resnet'; registered: bvit, rbvit, vit"):
        ModelConfig(arch="resnet")
    with pytest.raises(ValueError, match=r"unknown arch 'resnet'; registered: bvit, rbvit, vit"):
        get_arch("resnet")


@pytest.mark.parametrize("arch,field,value,readers", [
    ("vit", "step_embed", "learned", "'bvit' or 'rbvit'"),
    ("vit", "relax_rank", 2, "'rbvit'"),
    ("bvit", "relax_rank", 2, "'rbvit'"),
])
def test_an_option_of_another_arch_is_refused(arch, field, value, readers):
    with pytest.raises(ValidationError, match=f"{field} applies to arch {readers} only, not '{arch}'"):
        ModelConfig(arch=arch, **{field: value})


WIDTH_TRIAL = dict(  # the first row of results/width/trials.csv: bvit, width 16, steps 2, heads 2, seed 0
    model=dict(arch="bvit", width=16, steps=2, heads=2, img_size=28, patch_size=4, in_chans=1, num_classes=10),
    data=dict(path="data/fashion-mnist", train_subset=6000, batch_size=64, augment="none"),
    optim=dict(epochs=10, lr=2.0e-3, warmup_epochs=0.5), precision="fp32", eval_every=2, seed=0)


def test_committed_trial_ids_are_unchanged_by_relax_rank():
    """`model.relax_rank` came after results/width: at its default it is left out of the id."""
    cfg = TrialConfig.model_validate(WIDTH_TRIAL)
    assert cfg.trial_id() == "eaf48dd663"
    assert cfg.flat()["model.relax_rank"] == 0  # still a column of tables and tracking
    relaxed = {**WIDTH_TRIAL, "model": {**WIDTH_TRIAL["model"], "arch": "rbvit"}}
    ids = {TrialConfig.model_validate({**relaxed, "model": {**relaxed["model"], "relax_rank": r}}).trial_id()
           for r in (0, 2, 8)}
    assert len(ids) == 3 and "eaf48dd663" not in ids


# --- No branch on an arch's name outside the registry and the model files ---------------------------------

ALLOWED = ("bvit/archs.py", "bvit/models/")
MODULE_NAMES = {"__module__", "__name__", "__package__"}  # the package is called bvit too: not an arch


def _names_a_module(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in MODULE_NAMES for n in ast.walk(node))


def arch_branches(source: str) -> list[tuple[int, str]]:
    """(line, name) for every arch name written as a string literal in `source`, except where it only picks an
    arm: a keyword `arch=...`, the default of a field `arch`. Anything else -- compared (==, in, <=), matched,
    a dict key, an index, a `.get` key, a (name, style) pair -- is behaviour keyed by the name. Comparisons of
    module names (`__module__`, `__name__`) are left alone: the package is called bvit too."""
    tree = ast.parse(source)
    chosen: set[int] = set()
    for node in ast.walk(tree):
        picked = []
        if isinstance(node, ast.keyword) and node.arg == "arch":
            picked = [node.value]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "arch":
            picked = [node.value] if node.value is not None else []
        elif isinstance(node, ast.Compare) and any(_names_a_module(o) for o in (node.left, *node.comparators)):
            picked = [node]
        chosen |= {id(n) for p in picked for n in ast.walk(p)}
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in ARCHS and id(node) not in chosen)


def test_the_branch_finder_finds_branches():
    """Guards the test below: it must catch each form, and leave a choice of arm (a keyword, a default) alone."""
    code = """
if m.arch == "vit": pass
if arch in ("bvit", "rbvit"): pass
pairs = {"bvit", "vit"} <= set(arms)
style = {"bvit": "o", "vit": "s"}
n = arms["bvit"] + arms.get("vit", 0)
match arch:
    case "rbvit": pass
same = c.__module__.split(".")[0] == "bvit"
model = build_model(arch="vit", width=8)
style = {arch: marker for arch, marker in (("bvit", "o"), ("vit", "s"))}
arch: str = Field("bvit", description="...")
"""
    assert [line for line, _ in arch_branches(code)] == [2, 3, 3, 4, 4, 5, 5, 6, 6, 8, 11, 11]


def test_no_arch_name_branch_outside_the_registry_and_the_models():
    offenders = []
    for package in ("bvit", "orchestrator"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(ALLOWED):
                continue
            offenders += [f"{rel}:{line}: {name!r}" for line, name in arch_branches(path.read_text())]
    assert offenders == [], "branches on an arch's name (move the behaviour into bvit/archs.py):\n" + "\n".join(offenders)


@pytest.mark.parametrize("arch", ["bvit", "vit"])
def test_timm_create_model_initialises_as_the_direct_constructor(arch):
    """build_from_config goes through timm.create_model: a seed still gives the weights the committed results
    started from (the constructors called directly, as before the registry)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from bvit.models import BViT

    m = ModelConfig(arch=arch, width=64, steps=4, heads=4)
    common = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, global_pool="token", embed_dim=64,
                  num_heads=4, mlp_ratio=4.0, class_token=True, drop_path_rate=0.0)
    torch.manual_seed(3)
    direct = BViT(num_steps=4, **common) if arch == "bvit" else VisionTransformer(depth=4, **common)
    torch.manual_seed(3)
    built = build_from_config(m).state_dict()
    assert direct.state_dict().keys() == built.keys()
    assert all(torch.equal(v, built[k]) for k, v in direct.state_dict().items())
