"""Fine-tuning: start from exported weights, and choose which parts of the model train, or train
low-rank adapters instead of them.

In a recipe (``recipes/finetune/custom_shards.yaml``)::

    trainer:
      callbacks:
        - class_path: flowvid.lit.finetune.InitFromExport
          init_args: {path: exported/model.safetensors}
        - class_path: flowvid.lit.finetune.Freeze
          init_args: {modules: [flow.deep]}

or, for adapters on the flow's transformer layers instead of ``Freeze``::

        - class_path: flowvid.lit.finetune.LoRA
          init_args: {rank: 16}

``InitFromExport`` loads weights only: optimiser, schedule and step counters start afresh. When the
run is resumed (``resume: auto``), the checkpoint's weights win and the export is not read again.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors import safe_open
from safetensors.torch import load_file

from flowvid.export import CONFIG_NAME, decode_metadata, load_weights, reading_export
from flowvid.lit.checkpointing import METADATA_KEY, check_resumable
from flowvid.lit.ema import EMA
from flowvid.loading import export_in
from flowvid.nn.lora import (DEFAULT_TARGETS, LoRALinear, add_lora, check_lora_settings, check_targets_match,
                             is_adapter_key)
from flowvid.text.learned import LearnedTextEncoder

#: Shorthands for ``Freeze(modules=...)``.
PRESETS = {
    "deep": ["flow.deep"],
    "shallow": ["flow.shallow"],
    "denoiser_only": ["flow", "text_encoder"],
}


class InitFromExport(Callback):
    """Load a ``flowvid export`` (or ``flowvid convert``) file into the model before training starts.

    Args:
        path: the ``.safetensors`` file, or the folder of a ``flowvid export``.
        strict: every weight of the model must be in the file. With ``strict: false`` model weights
            the file lacks keep their initialisation (e.g. a new denoiser on an imported flow), and the
            log counts them by part; weights in the file that the model lacks, or of another shape, are
            always an error.
    """

    def __init__(self, path: str, strict: bool = True):
        self.path = path
        self.strict = strict
        # Set by FlowvidCLI when the run resumes from a checkpoint, whose weights then win; Lightning
        # itself says so (``trainer.ckpt_path``) only after ``setup``, too late to skip the file.
        self.resuming = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        for module in pl_module.modules():  # also on a resume: the checkpoint's weights came from the export
            if isinstance(module, LearnedTextEncoder):
                module.vocabulary_fixed = True
        if self.resuming or trainer.ckpt_path:
            return
        path = self.export_file()
        with reading_export(path), safe_open(str(path), framework="pt") as file:
            recorded = decode_metadata(file.metadata() or {})
        # The weights of a model that read other latents or other text states would load without a
        # complaint, and train from a meaningless start.
        identities = {"codec": recorded.get("codec"), "text_encoder": recorded.get("text_encoder")}
        check_resumable({METADATA_KEY: identities}, pl_module, f"the export {path}")
        with reading_export(path):
            state = load_file(path)
        unexpected = sorted(set(state) - set(pl_module.state_dict()))
        if unexpected:
            raise ValueError(f"{path} holds weights this model does not have: {', '.join(unexpected[:5])}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        load_weights(pl_module, state, where=str(path), strict=self.strict)
        rank_zero_info(f"initialised {len(state)} tensors from {path}{kept_initialisation(pl_module, state)}")

    def export_file(self) -> Path:
        """The ``.safetensors`` file that ``path`` names: itself, or the export in the folder it names."""
        path = Path(self.path)
        if not path.exists():
            raise FileNotFoundError(f"InitFromExport: {path} does not exist")
        if path.is_dir():
            found = export_in(path)
            if found is None:
                raise ValueError(f"InitFromExport: {path} is a folder without an export (a .safetensors file "
                                 f"beside {CONFIG_NAME}); give the .safetensors file")
            return found
        if path.suffix != ".safetensors":
            raise ValueError(f"InitFromExport: {path} is not an export (.safetensors); export a training checkpoint "
                             f"first: flowvid export --ckpt {path} --out exported/model.safetensors")
        return path


def kept_initialisation(module: LightningModule, state: dict) -> str:
    """What of ``module`` a ``strict: false`` load left at its initialisation, counted by top-level part: a
    wrong export would otherwise pass for a partial one."""
    kept = sorted(name for name in module.state_dict() if name not in state and not is_adapter_key(name))
    if not kept:
        return ""
    parts = Counter(name.partition(".")[0] for name in kept)
    listed = ", ".join(f"{part} ({count})" for part, count in sorted(parts.items()))
    return (f"; {len(kept)} tensors are not in it and keep their initialisation: {listed}, "
            f"e.g. {', '.join(kept[:3])}")


def submodules(module: LightningModule, names: list[str], callback: str) -> dict:
    """The sub-modules of ``module`` that ``names`` name; a name it lacks is an error listing its parts."""
    named = dict(module.named_modules())
    unknown = [name for name in names if name not in named]
    if unknown:
        parts = [name for name, _ in module.named_children()]
        raise ValueError(f"{callback}: {type(module).__name__} has no sub-module {', '.join(unknown)}; its parts are "
                         f"{', '.join(parts)} (name sub-modules with dots, e.g. flow.deep)")
    return {name: named[name] for name in names}


class Freeze(Callback):
    """Stop the named sub-modules from training (``requires_grad = False``).

    Args:
        modules: dotted names of sub-modules (``flow.deep``, ``flow.shallow``, ``flow``,
            ``text_encoder``, ...), or one preset: ``deep``, ``shallow`` or ``denoiser_only`` (the flow
            and text encoder frozen, only the denoiser trains).

    The model's moving average (``ema_decay``) then averages only what trains; the frozen weights stand
    for their own average.
    """

    def __init__(self, modules: list[str] | str):
        self.preset = isinstance(modules, str)
        if self.preset and modules not in PRESETS:
            raise ValueError(f"unknown Freeze preset {modules!r}; presets: {sorted(PRESETS)}, "
                             "or give a list of sub-module names")
        self.modules = list(PRESETS[modules] if self.preset else modules)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        named = dict(pl_module.named_modules())
        # A preset's optional parts (no text encoder) may be absent.
        names = [name for name in self.modules if name in named] if self.preset else self.modules
        chosen = submodules(pl_module, names, "Freeze")
        frozen = 0
        for module in chosen.values():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
                frozen += parameter.numel()
        if frozen == 0:  # the run would train everything, as if there were no Freeze
            parts = [name for name, _ in pl_module.named_children()]
            raise ValueError(f"Freeze({self.modules}) freezes no parameter ({type(pl_module).__name__} has no weights "
                             f"there), so everything would train; name sub-modules that hold weights (its parts are "
                             f"{', '.join(parts)}), or delete the callback to train everything")
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if trainable == 0:
            raise ValueError(f"Freeze({self.modules}) leaves nothing to train; leave at least one sub-module out")
        ema = getattr(pl_module, "ema", None)
        if isinstance(ema, EMA):  # made with the module, before this froze anything: it averages what trains
            ema.stop_averaging_frozen()
        if stage == "fit":  # validate trains nothing: the count would read as if it did
            rank_zero_info(f"froze {frozen:,} parameters of {', '.join(self.modules)}; {trainable:,} train")


class LoRA(Callback):
    """Train low-rank adapters instead of the weights of ``modules`` (see ``flowvid.nn.lora``).

    The linear layers of ``modules`` named by ``targets`` get adapters of rank ``rank``, and every
    other parameter of ``modules`` is frozen. Parts outside ``modules`` (the denoiser, the text
    encoder) keep training unless a ``Freeze`` names them. Checkpoints hold the frozen weights and the
    adapters (a resumed run continues with both); ``flowvid export``, ``generate`` and ``score`` merge
    the adapters into the weights, so what they produce has the architecture of the model adapted.

    Args:
        rank: the rank of every adapter.
        alpha: the adapters' scale is ``alpha / rank``; defaults to ``rank``.
        modules: dotted names of the sub-modules to adapt.
        targets: name suffixes of the linear layers to adapt, inside transformer layers.
    """

    def __init__(self, rank: int = 8, alpha: float | None = None, modules: list[str] | None = None,
                 targets: list[str] | None = None):
        check_lora_settings(rank, alpha)  # a bad recipe fails when it is read
        self.rank = rank
        self.alpha = alpha
        self.modules = list(modules or ["flow"])
        self.targets = list(targets or DEFAULT_TARGETS)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        named = submodules(pl_module, self.modules, "LoRA")
        if any(isinstance(layer, LoRALinear) for module in named.values() for layer in module.modules()):
            return  # adapted in an earlier stage of the same run
        # The default targets name both feed-forward kinds (mlp.fc, mlp.gate_up), of which a model has one.
        check_targets_match(list(named.values()), [target for target in self.targets if target not in DEFAULT_TARGETS])
        adapted = 0
        for module in named.values():
            module.requires_grad_(False)
            adapted += len(add_lora(module, self.rank, self.alpha, self.targets))
        ema = getattr(pl_module, "ema", None)
        if isinstance(ema, EMA):  # it averages what trains: now the adapters
            pl_module.ema = EMA(pl_module, ema.decay)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        adapters = sum(p.numel() for name, p in pl_module.named_parameters() if is_adapter_key(name))
        said = f"LoRA: {adapted} linear layers of {', '.join(self.modules)} adapted at rank {self.rank}"
        if stage == "fit":
            rank_zero_info(f"{said} ({adapters:,} adapter parameters); {trainable:,} parameters train in all, "
                           "adapters included")
        else:  # validate trains nothing
            rank_zero_info(f"{said} ({adapters:,} adapter parameters)")
