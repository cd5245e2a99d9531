"""Upstream's recipe: Adam-atan2 against steps computed by hand, the upstream-mirroring presets, epochs counted as
upstream's ``pretrain.py`` counts them, and the checkpoints kept per evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from etrm.config import Config, ConfigError
from etrm.presets import load_preset
from etrm.train.adam_atan2 import A_DEFAULT, AdamAtan2

UPSTREAM_PRESETS = ("arc1", "arc2", "sudoku", "maze")


def _steps(grads: list[list[float]], start: list[float], **kw) -> torch.Tensor:
    """``start`` after one Adam-atan2 step per gradient in ``grads``."""
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = AdamAtan2([p], **kw)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach()


def test_upstream_recipe_adam_atan2_matches_two_steps_by_hand() -> None:
    lr, b1, b2, wd, a = 0.1, 0.9, 0.99, 0.1, A_DEFAULT
    p0, g1, g2 = [1.0, -2.0, 0.5], [0.5, -3.0, 0.0], [-1.0, 2.0, 4.0]
    expected = []
    for x, u, w in zip(p0, g1, g2):
        m = v = 0.0
        for t, g in ((1, u), (2, w)):
            x *= 1 - lr * wd  # decoupled weight decay first
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            x -= lr * a * math.atan2(m_hat, math.sqrt(v_hat))
        expected.append(x)
    got = _steps([g1, g2], p0, lr=lr, betas=(b1, b2), weight_decay=wd)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    # the first step of a coordinate with a gradient is exactly lr * a * pi / 4 (m_hat = g, sqrt(v_hat) = |g|)
    one = _steps([g1], p0, lr=lr, betas=(b1, b2), weight_decay=0.0)
    assert (torch.tensor(p0) - one).tolist() == pytest.approx([lr * a * math.pi / 4, -lr * a * math.pi / 4, 0.0])


def test_upstream_recipe_adam_atan2_ignores_gradient_scale_and_bounds_each_step() -> None:
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(64, generator=g, dtype=torch.float64).tolist() for _ in range(6)]  # around 1
    start = torch.randn(64, generator=g, dtype=torch.float64).tolist()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    big = _steps(grads, start, **kw)
    tiny = _steps([[x * 1e-10 for x in row] for row in grads], start, **kw)
    torch.testing.assert_close(tiny, big, rtol=1e-9, atol=1e-12)
    # AdamW's epsilon dominates gradients of 1e-10: it barely moves where Adam-atan2 moves as at scale 1
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    adamw = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for row in grads:
        p.grad = torch.tensor(row, dtype=torch.float64) * 1e-10
        adamw.step()
    assert (p.detach() - torch.tensor(start, dtype=torch.float64)).abs().max() < 0.05 * (
        big - torch.tensor(start, dtype=torch.float64)).abs().max()
    # no coordinate ever moves more than lr * a * pi / 2 in one step, however the gradients jump
    q = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
    opt = AdamAtan2([q], **kw)
    bound = 1e-2 * A_DEFAULT * math.pi / 2
    for i in range(40):
        before = q.detach().clone()
        q.grad = torch.randn(64, generator=g, dtype=torch.float64) * 10.0 ** ((i % 9) - 4)
        opt.step()
        assert float((q.detach() - before).abs().max()) <= bound + 1e-15


@pytest.mark.parametrize("name", UPSTREAM_PRESETS)
def test_upstream_recipe_presets_use_adam_atan2_without_clipping(name: str) -> None:
    cfg = Config.from_dict(load_preset(name))
    assert (cfg.train.optimizer, cfg.train.grad_clip) == ("adam-atan2", 0.0)
    assert Config().train.optimizer == "adamw"  # our default stays AdamW
    with pytest.raises(ConfigError, match="train.optimizer='sgd'.*adamw, adam-atan2"):
        Config.from_dict({"train": {"optimizer": "sgd"}})


def test_upstream_recipe_trainer_steps_with_adam_atan2(make_trainer) -> None:
    trainer = make_trainer("trm", "train.optimizer=\"adam-atan2\"", "train.grad_clip=0")
    adam = trainer.optimizers[0]
    assert isinstance(adam, AdamAtan2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(3):
        trainer.train_step()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(adam.state[p]["step"] == 3 for p in adam.param_groups[0]["params"] if p in adam.state)
    again = make_trainer("trm", "train.optimizer=\"adam-atan2\"", "train.grad_clip=0")
    again.load_state_dict(trainer.state_dict())  # the optimizer state round-trips through a checkpoint
    assert again.optimizers[0].state_dict()["state"].keys() == adam.state_dict()["state"].keys()


# ---------------------------------------------------------------------------------------------------------------
# Epochs as upstream counts them

TINY_TRM = ["arch.hidden_size=16", "arch.num_heads=2", "arch.L_layers=1", "arch.L_cycles=1", "arch.H_cycles=1",
            "arch.puzzle_emb_len=2", "act.halt_max_steps=2", "train.batch_size=4", "train.eval_batch_size=4",
            "train.lr_warmup_steps=1", "train.device=\"cpu\""]


def test_upstream_recipe_epochs_give_upstreams_steps_per_epoch(tmp_path, monkeypatch, capsys) -> None:
    from upstream_files import PUZZLE_EXAMPLES, PUZZLE_GROUP, write_folder

    from etrm.cli import main
    from etrm.config import load_toml
    from etrm.train.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    root = write_folder(tmp_path / "data")
    # by hand, as upstream's pretrain.py: int(epochs * total_groups * mean_puzzle_examples / global_batch_size)
    groups = len(set(PUZZLE_GROUP))
    mean_examples = sum(PUZZLE_EXAMPLES) / len(PUZZLE_EXAMPLES)
    epochs, every, batch = 6, 2, 4
    assert (groups, mean_examples) == (3, 2.0)
    total = int(epochs * groups * mean_examples / batch)  # 9
    per_eval = int(every * groups * mean_examples / batch)  # 3
    run = tmp_path / "run"
    # the preset's max_steps (and eval_every) are replaced by the epochs
    assert main(["--preset", "demo-trm", "data.dataset=trm-folder", f"data.path={root}", "--run-dir", str(run),
                 *TINY_TRM, f"train.epochs={epochs}", f"train.eval_every_epochs={every}"]) == 0
    out = capsys.readouterr().out
    assert "1.50 steps per epoch (3 groups x 2.00 examples per puzzle / batch 4) = 9 steps" in out, out
    written = load_toml(run / "config.toml")["train"]
    assert (written["max_steps"], written["eval_every"]) == (total, per_eval)
    assert int(load_checkpoint(run)["step"]) == total


def test_upstream_recipe_epochs_and_explicit_max_steps_refused(tmp_path, monkeypatch, capsys) -> None:
    from etrm.cli import main

    monkeypatch.chdir(tmp_path)
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[train]\nepochs = 4\nmax_steps = 10\n")
    for argv in (["--preset", "demo-trm", "train.epochs=4", "--max-steps", "10"],
                 ["--preset", "demo-trm", "train.epochs=4", "train.max_steps=10"],
                 ["--preset", "demo-trm", "--config", str(cfg_file)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "train.epochs=4 and train.max_steps=10 are both given" in err[0], err
    with pytest.raises(ConfigError, match="eval_every_epochs=3.*divisor of train.epochs"):
        Config.from_dict({"train": {"epochs": 4, "eval_every_epochs": 3}})
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints kept per evaluation

def test_upstream_recipe_keep_checkpoints_every_eval(tmp_path, monkeypatch) -> None:
    from etrm.cli import main
    from etrm.train.checkpoint import load_checkpoint
    from etrm.train.retention import kept_steps

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    tiny = [*TINY_TRM, "data.canvas=4", "data.min_grid=2", "data.max_grid=3", "data.train_tasks=4",
            "data.heldout_tasks=2", "train.eval_every=2", "train.checkpoint_every=100"]
    every, last = tmp_path / "every", tmp_path / "last"
    assert main(["--preset", "demo-trm", "--run-dir", str(every), "--max-steps", "5", *tiny,
                 "train.keep_checkpoints=\"every-eval\""]) == 0
    assert main(["--preset", "demo-trm", "--run-dir", str(last), "--max-steps", "5", *tiny]) == 0
    kept = kept_steps(every)
    assert [s for s, _ in kept] == [2, 4, 5]  # one per evaluation, the last one included
    for step, path in kept:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert int(state["step"]) == step
    assert int(load_checkpoint(every)["step"]) == 5  # checkpoint.pt stays the resume point
    assert kept_steps(last) == [] and int(load_checkpoint(last)["step"]) == 5
    # the two runs trained alike: the checkpoint kept at the end equals the last run's resume point
    a = torch.load(kept[-1][1], map_location="cpu", weights_only=True)["model"]
    b = load_checkpoint(last)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------------------------------------------------------
# Upstream checkpoints: upstream's names and shapes (tests/train/upstream_files.py), into the right weights

HIDDEN, LAYERS, EXPANSION, VOCAB_U, IDS = 32, 2, 2.0, 12, 8


def _our_trm(num_ids: int = IDS):
    from etrm.model import ModelShape, build_model

    cfg = Config.from_dict({"model": "trm", "arch": {"hidden_size": HIDDEN, "num_heads": 2, "expansion": EXPANSION,
                                                     "L_layers": LAYERS, "puzzle_emb_len": 2}})
    return build_model(cfg, ModelShape(vocab_size=VOCAB_U, seq_len=9, num_puzzle_ids=num_ids))


@pytest.mark.parametrize("wrap", ["plain", "compiled", "training-state"])
def test_upstream_recipe_upstream_checkpoint_loads_into_the_right_weights(wrap: str, tmp_path) -> None:
    from upstream_files import upstream_state

    from etrm.checkpoints.upstream import UPSTREAM, load_weights, read

    state = upstream_state(HIDDEN, EXPANSION, LAYERS, VOCAB_U, IDS)
    saved: object = state
    if wrap == "compiled":
        saved = {"_orig_mod." + k: v for k, v in state.items()}
    elif wrap == "training-state":
        saved = {"model": {"_orig_mod." + k: v for k, v in state.items()}, "optimizers": [], "step": 7}
    path = tmp_path / "step_1234"
    torch.save(saved, path)
    opened = read(path)
    assert opened.kind == UPSTREAM and opened.step == (7 if wrap == "training-state" else 1234)
    model = _our_trm()
    load_weights(model, opened, "ema")
    ours = model.state_dict()
    u = lambda k: state["model.inner." + k]  # noqa: E731
    for i in range(LAYERS):
        q, kv = ours[f"core.blocks.{i}.attn.q_proj.weight"], ours[f"core.blocks.{i}.attn.kv_proj.weight"]
        k, v = kv[:HIDDEN], kv[HIDDEN:]
        # the fixture's q, k and v rows hold 10 * block + 1, + 2, + 3 (and a small random part)
        for part, rows in ((1, q), (2, k), (3, v)):
            assert (rows - (10.0 * i + part)).abs().max() < 0.1, (i, part)
        fused = u(f"L_level.layers.{i}.self_attn.qkv_proj.weight")
        assert torch.equal(q, fused[:HIDDEN]) and torch.equal(k, fused[HIDDEN:2 * HIDDEN])
        assert torch.equal(v, fused[2 * HIDDEN:])
        assert torch.equal(ours[f"core.blocks.{i}.mlp.gate_up.weight"], u(f"L_level.layers.{i}.mlp.gate_up_proj.weight"))
        assert torch.equal(ours[f"core.blocks.{i}.mlp.down.weight"], u(f"L_level.layers.{i}.mlp.down_proj.weight"))
        assert torch.equal(ours[f"core.blocks.{i}.attn.o_proj.weight"], u(f"L_level.layers.{i}.self_attn.o_proj.weight"))
    for theirs, mine in (("embed_tokens.embedding_weight", "core.embed_tokens"), ("lm_head.weight", "core.lm_head.weight"),
                         ("q_head.weight", "core.q_head.weight"), ("q_head.bias", "core.q_head.bias"),
                         ("H_init", "core.H_init"), ("L_init", "core.L_init"), ("puzzle_emb.weights", "puzzle_emb.weights")):
        assert torch.equal(ours[mine], u(theirs)), mine


def test_upstream_recipe_upstream_puzzle_table_follows_shifted_ids(tmp_path) -> None:
    from upstream_files import upstream_state

    from etrm.checkpoints.upstream import load_weights, read

    state = upstream_state(HIDDEN, EXPANSION, LAYERS, VOCAB_U, IDS)
    torch.save(state, tmp_path / "step_5")
    model = _our_trm(IDS + 1)  # our reader shifted upstream's identifiers up by one (id 0 is our blank)
    load_weights(model, read(tmp_path / "step_5"), "ema", id_shift=1)
    table = model.state_dict()["puzzle_emb.weights"]
    assert torch.equal(table[0], torch.zeros(HIDDEN)) and torch.equal(table[1:], state["model.inner.puzzle_emb.weights"])


def test_upstream_recipe_bad_upstream_checkpoints_name_the_problem(tmp_path) -> None:
    from upstream_files import upstream_state

    from etrm.checkpoints.upstream import load_weights, read
    from etrm.errors import UserError

    narrow = upstream_state(16, EXPANSION, LAYERS, VOCAB_U, IDS)
    torch.save(narrow, tmp_path / "narrow")
    with pytest.raises(UserError, match=r"'embed_tokens.embedding_weight' has shape \[12, 16\] in the checkpoint, "
                                        r"\[12, 32\] in the model"):
        load_weights(_our_trm(), read(tmp_path / "narrow"), "ema")
    one_layer = {k: v for k, v in upstream_state(HIDDEN, EXPANSION, LAYERS, VOCAB_U, IDS).items()
                 if ".layers.1." not in k}
    torch.save(one_layer, tmp_path / "short")
    with pytest.raises(UserError, match=r"lacks the weights of 'core.blocks.1"):
        load_weights(_our_trm(), read(tmp_path / "short"), "ema")
    bad_qkv = upstream_state(HIDDEN, EXPANSION, LAYERS, VOCAB_U, IDS)
    bad_qkv["model.inner.L_level.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(2 * HIDDEN, HIDDEN)
    torch.save(bad_qkv, tmp_path / "qkv")
    with pytest.raises(UserError, match=r"qkv_proj.weight' has shape \[64, 32\] in the checkpoint, \[96, 32\]"):
        load_weights(_our_trm(), read(tmp_path / "qkv"), "ema")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign")
    with pytest.raises(UserError, match="in no format this reads; tried an etrm checkpoint"):
        read(tmp_path / "foreign")
    whole = (tmp_path / "narrow").read_bytes()
    (tmp_path / "cut").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="corrupt or unreadable"):
        read(tmp_path / "cut")
