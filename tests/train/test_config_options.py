"""One home per setting: the command line, cfg.options and the range checks are derived from the
fields of TrainConfig and of each method's options dataclass, so a setting is written once."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from gradkit.cli import build_parser, main
from gradkit.cli.finetune import COMMAND_OPTIONS, config_from_args
from gradkit.cli.options import add_settings
from gradkit.errors import GradkitError
from gradkit.train import method_options
from gradkit.train.config import TrainConfig
from gradkit.train.method_options import CATALOGUE, OPTION_GROUPS, ZerothOrderOptions, check_options
from gradkit.train.settings import Range, check_settings, setting, settings_from


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _options(command: str) -> dict[str, argparse.Action]:
    parser = _subparser(command)
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_setting_has_help_text():
    for cls in (TrainConfig, *OPTION_GROUPS):
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help", "").strip(), f"{cls.__name__}.{field.name} has no help text"


@pytest.mark.parametrize("command", ["finetune", "compare"])
def test_every_option_maps_to_a_config_field_or_a_method_option_and_back(command):
    config_fields = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]}
    method_fields = {f.name for group in method_options.method_groups() for f in dataclasses.fields(group)}
    assert not config_fields & method_fields  # cfg.options and TrainConfig name different things
    given = set(_options(command)) - set(COMMAND_OPTIONS)
    expected = config_fields | method_fields | ({"method"} if command == "finetune" else set())
    assert given == expected


def test_the_derived_parser_gives_the_dataclass_defaults():
    args = build_parser().parse_args(["finetune"])
    defaults = {group: group() for group in method_options.method_groups()}
    options = {k: v for instance in defaults.values() for k, v in dataclasses.asdict(instance).items()}
    assert config_from_args(args, args.method) == TrainConfig(options=options)
    check_settings(TrainConfig())  # the defaults pass their own checks
    for group in OPTION_GROUPS:
        check_settings(group())


def test_the_catalogue_lists_every_registered_method():
    from gradkit.train.methods import available_methods

    assert set(CATALOGUE) == set(available_methods())
    assert all(card.summary for card in CATALOGUE.values())


def test_task_and_metric_choices_match_the_metrics_module():
    from gradkit.train.metrics import TASK_METRICS

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert fields["task"].metadata["choices"] == tuple(TASK_METRICS)
    assert set(fields["metric"].metadata["choices"]) == {m for ms in TASK_METRICS.values() for m in ms}


def test_the_model_and_data_options_are_declared_once_for_every_command():
    shared = ("model", "train", "text_col", "label_col", "max_length")
    helps = {
        name: {_options(c)[name].help for c in ("finetune", "compare", "noise-scale", "diagnose")}
        for name in shared
    }
    assert all(len(h) == 1 for h in helps.values()), helps
    assert _options("noise-scale")["max_length"].default == _options("diagnose")["max_length"].default == 64


EDGES = {
    "zo-eps-zero": (
        ("--method", "mezo", "--zo-eps", "0"),
        "--zo-eps 0.0 is not allowed: it must be finite and > 0",
    ),
    "zo-eps-negative": (("--method", "mezo", "--zo-eps", "-0.5"), "--zo-eps -0.5 is not allowed"),
    "zo-samples-zero": (("--method", "mezo", "--zo-samples", "0"), "--zo-samples 0 is not allowed"),
    "ga-batches-zero": (("--method", "lora-ga", "--ga-batches", "0"), "--ga-batches 0 is not allowed"),
    "ga-gamma-nan": (("--method", "lora-ga", "--ga-gamma", "nan"), "--ga-gamma nan is not allowed"),
    "pg-temperature-zero": (
        ("--method", "policy-gradient", "--pg-temperature", "0"),
        "--pg-temperature 0.0 is not allowed",
    ),
    "loraplus-ratio-nan": (("--method", "lora-plus", "--loraplus-ratio", "nan"), "--loraplus-ratio nan"),
    "loraplus-ratio-negative": (("--method", "lora-plus", "--loraplus-ratio", "-1"), "--loraplus-ratio -1.0"),
    "peft-ga-batches-zero": (("--method", "peft-lora-ga", "--peft-ga-batches", "0"), "--peft-ga-batches 0"),
    "peft-init-batches-zero": (("--method", "eva", "--peft-init-batches", "0"), "--peft-init-batches 0"),
    "eva-rho-below-one": (("--method", "eva", "--eva-rho", "0.5"), "--eva-rho 0.5 is not allowed"),
    "corda-method-unknown": (("--method", "corda", "--corda-method", "pca"), "--corda-method"),
    # a method's option is checked whichever method runs
    "zo-eps-zero-with-lora": (("--method", "lora", "--zo-eps", "0"), "--zo-eps 0.0 is not allowed"),
}


@pytest.mark.parametrize("case", list(EDGES), ids=list(EDGES))
def test_a_method_option_at_an_edge_is_refused_up_front(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    args, fragment = EDGES[case]
    code = main(["finetune", "--steps", "1", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gradkit: error: "), err
    assert fragment in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_valid_small_option_is_honoured_not_replaced_by_its_default():
    args = build_parser().parse_args(
        ["finetune", "--method", "mezo", "--zo-eps", "1e-6", "--zo-samples", "3"]
    )
    cfg = config_from_args(args, args.method)
    options = settings_from(ZerothOrderOptions, cfg.options)
    assert (options.zo_eps, options.zo_samples) == (1e-6, 3)
    assert settings_from(ZerothOrderOptions, {"pg_temperature": 0.01}).pg_temperature == 0.01


def test_library_options_are_checked_too():
    with pytest.raises(GradkitError, match="--zo-samples 0 is not allowed"):
        check_options({"zo_samples": 0})
    with pytest.raises(GradkitError, match="'zo_epsilon' belong to no method"):
        check_options({"zo_epsilon": 1e-3})
    with pytest.raises(GradkitError, match="--ga-scale 'huge' is not one of: stable, unit, gd"):
        check_options({"ga_scale": "huge"})
    check_options({"ga_batches": 2})  # a partial dict: the rest keep their defaults


def test_a_range_error_names_the_option_the_range_and_an_example():
    with pytest.raises(GradkitError) as err:
        check_settings(TrainConfig(lora_dropout=math.nan))
    assert str(err.value) == (
        "--lora-dropout nan is not allowed: it must be finite and in [0, 1); pass e.g. --lora-dropout 0.1"
    )
    assert Range(0, 0.5, low_open=True).describe() == "in (0, 0.5]"


def test_a_new_option_is_written_once(monkeypatch):
    """A method option added as one field (and its group named in the method's card) appears in
    ``--help``, reaches config.json through cfg.options, and is range-checked."""

    @dataclasses.dataclass(frozen=True)
    class KnobOptions:
        title = "knob"
        knob_count: int = setting(3, "how many knobs", range=Range(1), example="3")

    monkeypatch.setattr(method_options, "OPTION_GROUPS", (*OPTION_GROUPS, KnobOptions))
    card = dataclasses.replace(CATALOGUE["lora"], options=(KnobOptions,))
    monkeypatch.setitem(CATALOGUE, "lora", card)
    help_text = _subparser("finetune").format_help()
    assert (
        "--knob-count" in help_text and "how many knobs" in help_text and "knob (--method lora)" in help_text
    )
    args = build_parser().parse_args(["finetune", "--knob-count", "5"])
    cfg = config_from_args(args, "lora")
    assert cfg.to_dict()["options"]["knob_count"] == 5  # config.json is cfg.to_dict()
    with pytest.raises(GradkitError, match="--knob-count 0 is not allowed"):
        check_options({**cfg.options, "knob_count": 0})

    # a run setting: one field of a TrainConfig-shaped dataclass gives its option and its check
    @dataclasses.dataclass
    class Extended(TrainConfig):
        new_ratio: float = setting(0.5, "a new ratio", range=Range(0, 1), example="0.5", group="LoRA")

    parser = argparse.ArgumentParser()
    add_settings(parser, Extended)
    assert parser.parse_args(["--new-ratio", "0.25"]).new_ratio == 0.25
    with pytest.raises(
        GradkitError, match=r"--new-ratio 2.0 is not allowed: it must be finite and in \[0, 1\]"
    ):
        check_settings(Extended(new_ratio=2.0))
