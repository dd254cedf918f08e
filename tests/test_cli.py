"""The CLI's option defaults and help come from the config dataclasses, written once there."""

import dataclasses

import typer

from sglora_edge.cli import app
from sglora_edge.config import CVAEConfig, ExpertConfig, LoRASpec, PretrainConfig

CONFIGS_OF_COMMAND = {"pretrain": (PretrainConfig,), "train-experts": (ExpertConfig, LoRASpec),
                      "train-cvae": (CVAEConfig,), "explain": (CVAEConfig,)}


def test_options_named_after_a_config_field_take_its_default_and_help():
    commands = typer.main.get_command(app).commands
    for command, configs in CONFIGS_OF_COMMAND.items():
        fields = {f.name: f for c in configs for f in dataclasses.fields(c) if f.default is not dataclasses.MISSING}
        options = [p for p in commands[command].params if p.name in fields]
        assert len(options) >= 4 or command == "explain", command
        for p in options:
            f = fields[p.name]
            want = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            assert (p.default, p.help) == (want, f.metadata["help"]), (command, p.name)
