"""``FlowvidCLI``: LightningCLI plus ``resume: auto | none | PATH`` and self-describing checkpoints.

``flowvid fit --config recipe.yaml --resume auto`` (or ``resume: auto`` in the YAML) continues from
the newest checkpoint of the run directory, ``<trainer.default_root_dir>/checkpoints``, and starts
from scratch when there is none; so the same command both starts a run and restarts it after a crash
or a preemption. ``RunCheckpoint`` callbacks get the resolved config, which every checkpoint then
carries (and ``flowvid export`` writes out as ``config.yaml``).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from flowvid.lit.checkpointing import RunCheckpoint, checkpoint_dir_of, resolve_resume


class FlowvidCLI(LightningCLI):
    """LightningCLI with a ``--resume`` argument for ``fit`` (``auto``, ``none`` or a checkpoint path)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--resume", type=str | None, default=None,
            help="fit only: 'auto' continues from the newest checkpoint in <trainer.default_root_dir>/checkpoints "
                 "(or starts fresh when there is none), 'none' starts fresh, a path continues from that checkpoint",
        )

    def before_fit(self) -> None:
        settings = self.config_init[self.subcommand]
        resume = settings.get("resume")
        if resume is not None:
            if settings.get("ckpt_path"):
                raise ValueError(f"give either resume ({resume!r}) or ckpt_path ({settings.ckpt_path!r}), not both")
            settings.ckpt_path = resolve_resume(checkpoint_dir_of(self.trainer), resume)
        config = self.resolved_config()
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunCheckpoint):
                callback.run_config = config

    def resolved_config(self) -> dict[str, Any]:
        """The full config of this command as plain data (what ``config.yaml`` holds)."""
        parser = self._parser(self.subcommand)
        return yaml.safe_load(parser.dump(self.config[self.subcommand], skip_none=False))


def main(argv: list[str] | None = None) -> int:
    """Run ``FlowvidCLI`` as ``flowvid fit|validate|test|predict`` does."""
    from flowvid.lit.strategies import finish_distributed
    from flowvid.registry import load_plugins

    load_plugins()
    FlowvidCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )
    finish_distributed()
    return 0


if __name__ == "__main__":  # `python -m flowvid.lit.cli_support fit ...`; multi-device runs relaunch it
    sys.exit(main())
