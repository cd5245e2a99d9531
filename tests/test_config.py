"""Config: validation names the field and its allowed values; overrides and TOML round-trip to an equal config."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etrm.config import (
    ENCODER_MODES, FAULTS, Config, ConfigError, apply_overrides, dump_toml, load_toml, parse_override,
)


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    return str(info.value)


def test_defaults_are_valid_and_round_trip():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict({}) == cfg


@pytest.mark.parametrize("value", [0, -3])
def test_halt_max_steps_must_be_positive(value):
    msg = _error({"act": {"halt_max_steps": value}})
    assert "act.halt_max_steps" in msg and "allowed" in msg and ">= 1" in msg


def test_hidden_size_must_divide_by_heads():
    msg = _error({"arch": {"hidden_size": 66, "num_heads": 4}})
    assert "arch.hidden_size" in msg and "arch.num_heads" in msg and "multiple" in msg


def test_unknown_encoder_mode_lists_the_modes():
    msg = _error({"encoder": {"mode": "sometimes"}})
    assert "encoder.mode" in msg and "'sometimes'" in msg
    assert all(m in msg for m in ENCODER_MODES)


def test_unknown_fault_lists_every_fault():
    msg = _error({"fault": "gremlins"})
    assert "fault" in msg and "'gremlins'" in msg
    assert all(f in msg for f in FAULTS)


@pytest.mark.parametrize("data,field,known", [
    ({"arch": {"foo": 1}}, "arch.foo", ["hidden_size", "num_heads", "L_cycles"]),
    ({"bogus": 1}, "bogus", ["arch", "encoder", "fault", "model"]),
    ({"train": {"learning_rate": 1e-3}}, "train.learning_rate", ["lr", "batch_size"]),
])
def test_unknown_key_is_named_with_the_known_ones(data, field, known):
    msg = _error(data)
    assert field in msg and "unknown" in msg
    assert all(k in msg for k in known)


@pytest.mark.parametrize("data,field,kind", [
    ({"arch": {"hidden_size": "big"}}, "arch.hidden_size", "int"),
    ({"arch": {"hidden_size": 64.0}}, "arch.hidden_size", "int"),
    ({"act": {"halt_max_steps": True}}, "act.halt_max_steps", "int"),
    ({"act": {"q_continue": "yes"}}, "act.q_continue", "bool"),
    ({"train": {"lr": "fast"}}, "train.lr", "float"),
    ({"model": 3}, "model", "str"),
    ({"data": {"families": [1, 2]}}, "data.families", "list"),
])
def test_wrong_type_names_field_and_type(data, field, kind):
    msg = _error(data)
    assert field in msg and kind in msg


def test_section_must_be_a_table():
    msg = _error({"arch": 5})
    assert "arch" in msg and "table" in msg


@pytest.mark.parametrize("data,field", [
    ({"model": "gpt"}, "model"),
    ({"loss": {"kind": "hinge"}}, "loss.kind"),
    ({"train": {"sampler": "random"}}, "train.sampler"),
    ({"act": {"halt_exploration_prob": 1.5}}, "act.halt_exploration_prob"),
    ({"fct": {"steps": 0}}, "fct.steps"),
    ({"arch": {"hidden_size": 36, "num_heads": 4}}, "arch.hidden_size"),  # head_dim 9: odd, no RoPE
    ({"data": {"min_grid": 7, "max_grid": 6}}, "data.min_grid"),
    ({"fault": "encode-full-batch", "encoder": {"mode": "reencode"}}, "fault=encode-full-batch"),
    ({"fault": "constant-context", "model": "trm"}, "fault=constant-context"),
])
def test_other_bad_values(data, field):
    msg = _error(data)
    assert field in msg and "allowed" in msg


def test_ints_are_accepted_for_floats_and_lists_for_tuples():
    cfg = Config.from_dict({"train": {"lr": 1}, "data": {"families": ["a", "b"]}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.families == ("a", "b")


def test_mode_properties():
    fct = Config.from_dict({"encoder": {"mode": "fct"}, "fct": {"steps": 5}, "act": {"halt_max_steps": 9}})
    assert fct.fct_mode and fct.max_steps_per_sample == 5
    trm = Config.from_dict({"model": "trm", "encoder": {"mode": "fct"}, "act": {"halt_max_steps": 9}})
    assert not trm.fct_mode and trm.max_steps_per_sample == 9


# --------------------------------------------------------------------------------------------------------------------
# Overrides and TOML


def test_parse_override_types_values():
    assert parse_override("arch.L_cycles=4") == (["arch", "L_cycles"], 4)
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("act.q_continue=true") == (["act", "q_continue"], True)
    assert parse_override("encoder.mode=cached") == (["encoder", "mode"], "cached")
    assert parse_override('fault="label-from-batch"') == (["fault"], "label-from-batch")
    assert parse_override("data.families=[\"gravity\", \"dihedral\"]") == (["data", "families"], ["gravity", "dihedral"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("arch.L_cycles")
    with pytest.raises(ConfigError, match="no key"):
        parse_override("=4")


def test_apply_overrides_then_from_dict():
    base = Config().to_dict()
    data = apply_overrides(base, ["arch.L_cycles=4", "encoder.mode=cached", "act.q_continue=true",
                                  "train.lr=3e-4", "data.families=gravity,dihedral", "fault=label-from-batch"])
    assert base["arch"]["L_cycles"] == Config().arch.L_cycles  # the input is not modified
    cfg = Config.from_dict(data)
    assert cfg.arch.L_cycles == 4 and cfg.encoder.mode == "cached" and cfg.act.q_continue is True
    assert cfg.train.lr == 3e-4 and cfg.data.families == ("gravity", "dihedral") and cfg.fault == "label-from-batch"
    assert Config.from_dict(cfg.to_dict()) == cfg
    # overrides into an empty dict build the same config
    assert Config.from_dict(apply_overrides({}, ["arch.L_cycles=4"])).arch.L_cycles == 4
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(base, ["model.kind=trm"])
    with pytest.raises(ConfigError, match="arch.L_cycles"):
        Config.from_dict(apply_overrides(base, ["arch.L_cycles=four"]))


configs = st.fixed_dictionaries({
    "model": st.sampled_from(["trm", "etrm"]),
    "arch": st.fixed_dictionaries({
        "num_heads": st.sampled_from([1, 2, 4]),
        "L_cycles": st.integers(1, 8),
        "expansion": st.floats(0.25, 8.0, allow_nan=False),
        "rope_theta": st.floats(1.0, 1e6),
    }),
    "encoder": st.fixed_dictionaries({"mode": st.sampled_from(ENCODER_MODES)}),
    "act": st.fixed_dictionaries({
        "halt_max_steps": st.integers(1, 32), "halt_exploration_prob": st.floats(0.0, 1.0),
        "q_continue": st.booleans(),
    }),
    "train": st.fixed_dictionaries({"lr": st.floats(1e-8, 1.0), "seed": st.integers(0, 2**31),
                                    "weight_decay": st.floats(0.0, 1.0)}),
    "data": st.fixed_dictionaries({"families": st.lists(st.sampled_from(["gravity", "dihedral", "a\"b", "c\\d"]),
                                                        max_size=3)}),
})


@given(data=configs)
def test_dump_toml_round_trips(data):
    cfg = Config.from_dict(data)
    text = dump_toml(cfg.to_dict())
    back = Config.from_dict(tomllib.loads(text))
    assert back == cfg


def test_load_toml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("arch = [\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_toml(bad)
    good = tmp_path / "good.toml"
    good.write_text(dump_toml(Config(model="trm").to_dict()))
    assert Config.from_dict(load_toml(good)) == Config(model="trm")
