"""Mechanistic analysis: identities the measurements must satisfy, and the analyze command end to end."""
import copy
import json
import math

import pytest
import torch
import typer
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from bvit.analysis.measure import (
    _states,
    _vit_blocks,
    analyze,
    attention_entropy,
    attention_probs,
    depth_curves,
    linear_cka,
    mean_attention_distance,
    state_statistics,
)
from bvit.analysis.plots import plot_analyses
from bvit.checkpoint import load_trained, save_checkpoint
from bvit.config import CHECKPOINT_NAME, TrialConfig
from bvit.engine import evaluate
from bvit.trial import run_trial
from orchestrator.analyze import log_analysis, resolve_checkpoint
from orchestrator.cli import app as cli_app

T, D = 3, 32
CFG = TrialConfig.model_validate({"model": {"width": D, "steps": T, "heads": 2}})
CPU = torch.device("cpu")


def loader(n: int = 40, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=batch)


X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))


def test_skipping_no_step_equals_the_normal_forward(tiny):
    model = tiny()
    curves = depth_curves(model, loader(), cfg=CFG, device=CPU, extra_steps=2)
    assert curves["full"] == evaluate(model, loader(), cfg=CFG, device=CPU)
    assert curves["anytime"][T - 1] == {"steps": T, "extrapolated": False, **curves["full"]}
    assert [p["skipped"] for p in curves["step_skip"]] == list(range(T))
    assert curves["step_skip"][1]["test_loss"] == evaluate(model, loader(), cfg=CFG, device=CPU,
                                                         skip_steps=(1,))["test_loss"]
    assert [a["steps"] for a in curves["anytime"]] == [1, 2, 3, 4, 5]
    assert [a["extrapolated"] for a in curves["anytime"]] == [False] * 3 + [True] * 2

    vit = tiny("vit")
    with _vit_blocks(vit, range(T)):
        assert torch.equal(vit(X), tiny("vit")(X))
    reference = copy.deepcopy(vit)
    reference.blocks[1] = torch.nn.Identity()
    with _vit_blocks(vit, [0, 2]):
        assert torch.equal(vit(X), reference(X))
    assert len(vit.blocks) == T  # restored


def test_bvit_steps_are_interchangeable_without_step_embeddings_but_not_with_them(tiny):
    model = tiny()
    curves = depth_curves(model, loader(), cfg=CFG, device=CPU, extra_steps=0)
    shorter = {k: v for k, v in curves["anytime"][T - 2].items() if k not in ("steps", "extrapolated")}
    for row in curves["step_skip"]:
        assert {k: v for k, v in row.items() if k not in ("skipped", "drop")} == shorter
    embedded = tiny(step_embed="learned")
    with torch.no_grad():
        embedded.step_embed.normal_(std=1.0)
    losses = [row["test_loss"] for row in depth_curves(embedded, loader(), cfg=CFG, device=CPU)["step_skip"]]
    assert len(set(losses)) == T


def test_states_are_the_models_own_hidden_states(tiny):
    model, vit = tiny(), tiny("vit")
    states = _states(model, X)
    assert len(states) == T + 1
    assert torch.equal(model.norm(states[-1]), model.forward_features(X))
    vit_states = _states(vit, X)
    assert len(vit_states) == T + 1
    assert torch.equal(vit.norm(vit_states[-1]), vit.forward_features(X))
    assert torch.equal(vit_states[1], vit.blocks[0](vit_states[0]))


def test_cka_of_a_state_with_itself_is_one_and_invariant_to_rotation_and_scale(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(500, 16, generator=g)) < 0.1

    model = tiny()
    stats = state_statistics(model, loader(), max_images=None)
    cka = torch.tensor(stats["cka"], dtype=torch.float64)
    assert cka.shape == (T + 1, T + 1)
    torch.testing.assert_close(cka.diagonal(), torch.ones(T + 1, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(cka, cka.T, rtol=0, atol=0)
    # accumulated over 3 batches == computed at once over every token of every image
    with torch.no_grad():
        states = _states(model, torch.cat([x for x, _ in loader()]))
    assert stats["cka"][0][T] == pytest.approx(linear_cka(states[0].flatten(0, 1), states[T].flatten(0, 1)), abs=1e-9)


def test_norms_and_relative_updates_match_their_definitions(tiny):
    model = tiny()
    stats = state_statistics(model, loader(), max_images=24)
    assert stats["images"] == 24
    with torch.no_grad():
        states = _states(model, torch.cat([x for x, _ in loader()])[:24])
    for t in range(T + 1):
        assert stats["norm"][t] == pytest.approx(states[t].norm(dim=-1).mean().item(), rel=1e-6)
    rel = [((b - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean().item()
           for a, b in zip(states, states[1:], strict=False)]
    assert stats["relative_update"] == pytest.approx(rel, rel=1e-6)


def test_uniform_attention_has_entropy_log_n(tiny):
    assert attention_entropy(torch.full((2, 3, 50, 50), 1 / 50)).tolist() == pytest.approx([math.log(50)] * 3)
    assert attention_entropy(torch.eye(50).expand(2, 3, 50, 50)).tolist() == [0.0, 0.0, 0.0]
    model = tiny()
    with torch.no_grad():  # q = k = 0: every query attends uniformly to all 50 tokens
        model.block.attn.qkv.weight[: 2 * D].zero_()
        model.block.attn.qkv.bias[: 2 * D].zero_()
    stats = state_statistics(model, loader(), max_images=16)
    assert stats["max_entropy"] == pytest.approx(math.log(50))
    assert torch.tensor(stats["attention_entropy"]).shape == (T, 2)
    torch.testing.assert_close(torch.tensor(stats["attention_entropy"], dtype=torch.float64),
                               torch.full((T, 2), math.log(50), dtype=torch.float64), rtol=0, atol=1e-6)


def test_attention_probs_equal_timms_unfused_attention_matrix(tiny):
    model = tiny()
    attn = model.block.attn
    attn.fused_attn = False
    seen, mine = [], []
    attn.attn_drop.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    attn.register_forward_hook(lambda m, args, _o: mine.append(attention_probs(m, args[0])))
    with torch.no_grad():
        model(X)
    assert len(seen) == len(mine) == T
    for a, b in zip(seen, mine, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mean_attention_distance_in_patches():
    eye = torch.eye(4).expand(1, 2, 4, 4)
    assert mean_attention_distance(eye, grid_size=(2, 2), num_prefix_tokens=0).tolist() == [0.0, 0.0]
    uniform = torch.full((1, 1, 4, 4), 0.25)  # keys at distance 0, 1, 1 and sqrt(2) from every query
    assert mean_attention_distance(uniform, grid_size=(2, 2), num_prefix_tokens=0).item() == pytest.approx(
        (2 + math.sqrt(2)) / 4)
    with_cls = torch.zeros(1, 1, 5, 5)
    with_cls[..., 0] = 0.9  # most attention on the class token, which is excluded and renormalised away
    with_cls[..., 1:] = 0.025
    assert mean_attention_distance(with_cls, grid_size=(2, 2), num_prefix_tokens=1).item() == pytest.approx(
        (2 + math.sqrt(2)) / 4)
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        mean_attention_distance(uniform, grid_size=(3, 3), num_prefix_tokens=0)


def test_analyze_bvit_and_vit_json_and_plots(tiny, tmp_path):
    results = {arch: analyze(tiny(arch), loader(), cfg=CFG, device=CPU, stats_images=16, extra_steps=2)
               for arch in ("bvit", "vit")}
    json.loads(json.dumps(results))
    assert len(results["bvit"]["anytime"]) == T + 2 and len(results["vit"]["anytime"]) == T
    assert len(results["vit"]["step_skip"]) == T and len(results["vit"]["attention_entropy"]) == T
    paths = plot_analyses(results, out=tmp_path)
    assert sorted(p.name for p in paths) == ["anytime.png", "attention.png", "cka.png", "states.png", "step_skip.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_load_trained_round_trip_and_errors(tiny, tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"model": model.state_dict(), "config": CFG.model_dump(mode="json")})
    loaded, cfg = load_trained(tmp_path)
    assert cfg == CFG and not loaded.training
    assert torch.equal(loaded(X), model(X))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_trained(tmp_path / "nope")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_trained(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "noweights.pt", {"config": CFG.model_dump(mode="json")})
    with pytest.raises(ValueError, match="not a bvit-sweep training checkpoint .no 'model'"):
        load_trained(tmp_path / "noweights.pt")
    bad = CFG.model_dump(mode="json")
    bad["model"]["width"] = 33
    save_checkpoint(tmp_path / "bad.pt", {"model": model.state_dict(), "config": bad})
    with pytest.raises(ValueError, match="config is not valid here .model: width=33 is not divisible"):
        load_trained(tmp_path / "bad.pt")


@pytest.fixture(scope="module")
def trained(fmnist_dir, tmp_path_factory):
    """A tiny bViT trained for one epoch on 1,024 real Fashion-MNIST images: (checkpoint dir, config)."""
    cfg = TrialConfig.model_validate({
        "model": {"width": D, "steps": T, "heads": 2},
        "data": {"path": str(fmnist_dir), "train_subset": 1024, "batch_size": 128, "num_workers": 1},
        "optim": {"epochs": 1, "warmup_epochs": 0.2}})
    out = tmp_path_factory.mktemp("trained")
    run_trial(cfg, checkpoint_dir=out, trial_id=SWEEP_ID)  # as a sweep trains it: under the spec's trial id
    return out, cfg


SWEEP_ID = "0123456789"  # a spec's id of the config as written (the checkpoint's config has other paths)


def _cli() -> typer.Typer:
    return cli_app


def test_analyze_command_on_a_trained_checkpoint(trained, tmp_path, monkeypatch):
    ckpt, cfg = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "analysis"
    r = CliRunner().invoke(_cli(), ["analyze", str(ckpt / CHECKPOINT_NAME), "--out", str(out), "--max-images", "500",
                                    "--stats-images", "64", "--extra-steps", "2", "--prune-images", "100",
                                    "--mlp-groups", "4"])
    assert r.exit_code == 0, r.output
    text = r.stdout
    r = CliRunner().invoke(_cli(), ["analyze", str(ckpt / CHECKPOINT_NAME), "--out", str(out), "--max-images", "500",
                                    "--stats-images", "64", "--extra-steps", "2", "--prune-images", "100",
                                    "--mlp-groups", "4", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    (label, result), = doc.items()
    assert label == f"bvit-w{D}-T{T}-{SWEEP_ID}" and result["sweep_trial_id"] == SWEEP_ID  # the checkpoint's id
    assert json.loads((out / "analysis.json").read_text()) == doc
    assert {p.name for p in out.glob("*.png")} == {"anytime.png", "attention.png", "cka.png", "step_skip.png",
                                                   "states.png", "importance.png"}
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (label2, imp), = json.loads((out / "importance.json").read_text()).items()
    assert label2 == label and imp == result["importance"] and imp["images"] == 100
    assert imp["components"] == ["head 0", "head 1", "mlp 0", "mlp 1", "mlp 2", "mlp 3"]
    for key in ("loss_increase", "top1_drop"):  # steps x components
        assert len(imp[key]) == T and all(len(row) == 6 for row in imp[key])
    assert len(imp["rank_correlation"]) == T and all(len(row) == T for row in imp["rank_correlation"])
    assert imp["rank_correlation"][0][0] == pytest.approx(1.0)
    assert "step-specific pruning: mean rank correlation" in text and "anytime depth: top-1 by steps used" in text
    assert [p["steps"] for p in result["anytime"]] == [1, 2, 3, 4, 5]
    assert result["anytime"][T - 1]["test_top1"] == result["full"]["test_top1"]
    assert result["full"]["test_top1"] > 15.0  # learned: chance on 500 images stays under 12.7 % (95 %)
    assert "not logged to MLflow" in r.stderr


def test_analyze_command_bad_input_gives_one_line_and_exit_2(tmp_path):
    r = CliRunner().invoke(_cli(), ["analyze", "0123456789"])
    assert r.exit_code == 2
    assert "looks like a trial id; pass the trial's checkpoint" in r.stderr
    r = CliRunner().invoke(_cli(), ["analyze", str(tmp_path)])
    assert r.exit_code == 2 and f"{tmp_path}: no checkpoint.pt here" in r.stderr


def test_checkpoint_arguments_resolve_like_a_tune_trial_directory(tmp_path):
    trial = tmp_path / "run_trial_0"
    for n in (1, 2):
        (trial / f"checkpoint_00000{n}").mkdir(parents=True)
        (trial / f"checkpoint_00000{n}" / CHECKPOINT_NAME).write_bytes(b"")
    newest = trial / "checkpoint_000002" / CHECKPOINT_NAME
    assert resolve_checkpoint(str(trial)) == newest
    assert resolve_checkpoint(str(newest.parent)) == newest == resolve_checkpoint(str(newest))


def test_analysis_is_logged_to_the_trials_mlflow_run(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    ckpt, cfg = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp, tags={"bvit.trial_id": cfg.trial_id()})
    other = {"sweep_trial_id": "ffffffffff", "anytime": [], "step_skip": []}
    model, _ = load_trained(ckpt)
    result = analyze(model, loader(), cfg=cfg, device=CPU, stats_images=16, extra_steps=1)
    results = {"mine": {**result, "sweep_trial_id": cfg.trial_id()}, "orphan": other}
    out = tmp_path / "out"
    out.mkdir()
    (out / "analysis.json").write_text(json.dumps(results))
    plot_analyses({"mine": result}, out=out)
    notes = log_analysis(results, out=out, uri=uri)
    assert notes[0] == f"mine: logged to MLflow run {run.info.run_id}"
    assert "orphan: no MLflow run tagged bvit.trial_id=ffffffffff" in notes[1]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert {"analysis/analysis.json", "analysis/anytime.png", "analysis/cka.png"} <= logged
    history = client.get_metric_history(run.info.run_id, "analysis_anytime_top1")
    assert [int(m.step) for m in history] == [1, 2, 3, 4]
