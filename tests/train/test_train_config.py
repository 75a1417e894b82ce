"""Training config: TOML + dotted overrides, type checks, unknown keys with suggestions."""

from __future__ import annotations

import pytest

from behemoth.train.config import build_config, valid_keys


def test_overrides_and_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[optim]\nlr = 0.002\nschedule = "wsd"\n[train]\nsteps = 7\n[data]\ntasks = ["add", "mul"]\n')
    cfg = build_config(str(toml), ["--optim.lr=3e-4", "--train.batch_size", "4", "--train.compile=true",
                                   "--data.tokenizer=none"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.schedule == "wsd" and cfg.train.steps == 7
    assert cfg.train.batch_size == 4 and cfg.train.compile is True and cfg.data.tasks == ["add", "mul"]
    assert cfg.data.tokenizer is None
    assert build_config(None, ["--data.tasks=add,sort"]).data.tasks == ["add", "sort"]
    assert "optim.lr" in valid_keys() and "router.bias_update_rate" in valid_keys()


@pytest.mark.parametrize("args,match", [
    (["--optim.lrr=1"], "did you mean 'optim.lr'"),
    (["--router.bias_update_rat=0.1"], "did you mean 'router.bias_update_rate'"),
    (["--router.bias_update=median"], "router.bias_update"),
    (["--optim.lr=abc"], "optim.lr='abc': expected float"),
    (["--train.steps=1.5"], "train.steps"),
    (["--train.compile=maybe"], "train.compile"),
    (["--train.steps=0"], "train.steps"),
    (["--optim.schedule=linear"], "optim.schedule"),
    (["steps=3"], "overrides look like"),
])
def test_bad_overrides(args, match):
    with pytest.raises(ValueError, match=match):
        build_config(None, args)


def test_bad_toml(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown key 'optim.learning_rate'"):
        build_config(str(f))
    f.write_text("[optim\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        build_config(str(f))
    with pytest.raises(ValueError, match="no such file"):
        build_config(str(tmp_path / "missing.toml"))


def test_resume_takes_settings_a_saved_run_predates_as_their_defaults(tmp_path):
    """A run saved before a data/distill setting existed resumes (the setting counts as its default); a changed
    one is named."""
    from behemoth.train.config import TrainConfig
    from behemoth.train.models import check_resume

    cfg = TrainConfig()
    saved = cfg.to_dict()
    del saved["distill"]["vocab_match"], saved["distill"]["cross_method"]
    check_resume(cfg, saved, None, None, tmp_path)
    saved["distill"]["loss"] = "jsd"
    saved["data"]["future_setting"] = 3
    with pytest.raises(ValueError, match="incompatible resume: data.future_setting differs"):
        check_resume(cfg, saved, None, None, tmp_path)
