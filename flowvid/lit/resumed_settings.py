"""What a run resumed with another value of a setting its checkpoint records does: refused, or warned of
with both values and what the change means for the run.

Not compared here: the rates, weight decay and the schedule's length (``FlowModule.on_train_start`` warns of
them), the moving average (``on_load_checkpoint``), the fixes advised after a divergence (grad_clip,
skip_threshold) and what changes no result (compile_flow).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

_SCHEDULE_REBUILT = "the learning-rate schedule is rebuilt with it, so the rate jumps at the resumed step"
_SAMPLED_WITH_THE_NEW = ("the samples logged from here, and generating from the checkpoints written from here, "
                         "use the new {}")

#: Settings whose change would make one checkpoint hold a model trained on two objectives.
REFUSED: dict[str, str] = {
    "noise_std": "noise_std is the sigma of the noise the flow is trained on, the sigma the denoiser learns to "
                 "remove and the sigma the sampler's denoising step assumes, so one checkpoint would hold a model "
                 "trained on two objectives",
}

#: Settings a run may change on resuming, and what that changes.
WARNED: dict[str, str] = {
    "text_dropout": "from here another share of the captions is dropped, so the unconditional model that guidance "
                    "relies on trains on another share than before",
    "extend_prob": "from here another share of the batches trains extension",
    "v2v_prob": "from here another share of the batches with a source clip trains video-to-video",
    "latent_norm_penalty": "the loss changes from here, and train/loss jumps at the resumed step",
    "video_shape": "the model trains, validates and samples clips of another size from here",
    "guidance": _SAMPLED_WITH_THE_NEW.format("weight"),
    "sampler": _SAMPLED_WITH_THE_NEW.format("sampler"),
    "warmup_steps": _SCHEDULE_REBUILT,
    "min_lr": _SCHEDULE_REBUILT,
    "accumulate_grad_batches": "each optimiser step averages another number of batches from here: another "
                               "effective batch size",
    "precision": "the steps from here compute at another precision, so their losses, speed and memory differ from "
                 "the run's so far",
}


def check_resumed_settings(recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse (ValueError) or warn of each setting of ``REFUSED`` and ``WARNED`` whose ``current`` value differs
    from the one ``recorded`` by the checkpoint's run; one that either side lacks (older checkpoints) is passed
    over."""
    for key, consequence in {**REFUSED, **WARNED}.items():
        if key not in recorded or key not in current:
            continue
        then, now = _comparable(recorded[key]), _comparable(current[key])
        if then == now:
            continue
        said = f"resuming with {key}={now!r} where the run had {then!r}: {consequence}"
        if key in REFUSED:
            raise ValueError(f"{said}; resume with --model.init_args.{key} {then!r}, or train at {now!r} in a new run "
                             "that starts from the checkpoint's weights (flowvid export it, then InitFromExport: "
                             "docs/finetune.md)")
        rank_zero_warn(said)


def _comparable(value: Any) -> Any:
    # A config read back from YAML gives lists where Python gave tuples.
    return list(value) if isinstance(value, tuple) else value
