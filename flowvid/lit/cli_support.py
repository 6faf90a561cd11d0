"""``FlowvidCLI``: LightningCLI plus ``resume: auto | none | PATH`` and self-describing checkpoints.

``flowvid fit --config recipe.yaml --resume auto`` (or ``resume: auto`` in the YAML) continues from
the newest checkpoint of the run directory, ``<trainer.default_root_dir>/checkpoints``, and starts
from scratch when there is none; so the same command both starts a run and restarts it after a crash
or a preemption. ``RunCheckpoint`` callbacks get the resolved config, which every checkpoint then
carries (and ``flowvid export`` writes out as ``config.yaml``).

A wrong value, path or checkpoint found before the first loop starts (while the recipe's classes are
built, the resume point is found, the data and the model are checked) is reported in one line, exit
status 2; ``FLOWVID_TRACEBACK=1`` shows the traceback instead. Later errors keep their traceback, except
the stop of a diverged run (``TrainingDiverged``), one line with exit status 1, and a stop by Ctrl-C, at any
moment (a checkpoint being written included), one line with exit status 130.

``flowvid fit`` ends by naming the run's newest checkpoint, its TensorBoard folder and the commands that take
the checkpoint on (``FitSummary``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, NoReturn

import yaml
from jsonargparse._common import debug_mode_active
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from flowvid.cli import CTRL_C_EXIT_STATUS, warnings_for_the_console
from flowvid.lit.checkpointing import (
    CorruptCheckpointError,
    RunCheckpoint,
    checkpoint_dir_of,
    has_run_checkpoint,
    list_checkpoints,
    load_client_state,
    resolve_checkpoint,
    resolve_resume,
    shown,
)
from flowvid.lit.finetune import InitFromExport
from flowvid.lit.module import TrainingDiverged
from flowvid.lit.progress import StepProgressBar
from flowvid.lit.tensorboard import without_placeholder_metric
from flowvid.loading import export_in
from flowvid.registry import accepted_arguments, class_path_for, did_you_mean, imported
from flowvid.text.base import TextEncoder


#: The values of ``ckpt_path`` that Lightning reads as names, not paths.
LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")

#: Added to the name of a checkpoint that cannot be read when a resumed run sets it aside.
UNREADABLE_SUFFIX = ".unreadable"

#: What a mistake in a command's inputs raises (a value, a path, a checkpoint).
INPUT_ERRORS = (ValueError, FileNotFoundError, CorruptCheckpointError, MisconfigurationException)


class LoopStarted(Callback):
    """Notes when the first loop starts: an input error before it is the inputs' fault, not a crash."""

    started = False

    def _mark(self, *args: Any) -> None:
        LoopStarted.started = True

    on_train_start = on_validation_start = _mark


class FitSummary(Callback):
    """Ends ``flowvid fit`` by saying where the run's newest checkpoint and its logs are, and the commands that
    take the checkpoint on: after the last step, after a resume that found nothing left to train, and after a
    stop by SIGTERM or a first Ctrl-C (for which ``RunCheckpoint`` saves the step in progress; the command that
    continues the run comes first then). After a diverged run (``TrainingDiverged``) only the checkpoint and
    the logs, before the error. Not after a crash or a second Ctrl-C, which save nothing.

    ``command`` is the fit command line as given (without ``flowvid``), for the command that resumes it;
    ``resumes_auto`` says that it resumes with ``resume: auto`` already."""

    #: The command line ``main`` was given, as typed: what ``flowvid fit`` passes on as ``command``.
    command_line: list[str] | None = None
    #: Whether the run resumed at its end and trained nothing (``main`` then removes its new, empty log folder).
    resumed_at_its_end = False

    def __init__(self, command: list[str] | None = None, resumes_auto: bool = False):
        self.command = command
        self.resumes_auto = resumes_auto
        self.trained = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trained = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.trained and trainer.global_step > 0:  # resumed at its end: Lightning skips the loop
            FitSummary.resumed_at_its_end = True
            print_on_first_process(trainer, nothing_to_train(trainer, pl_module))
        else:
            print_fit_summary(trainer, pl_module, stopped=False)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            print_fit_summary(trainer, pl_module, stopped=True, resume=self.resume_command())
        elif isinstance(exception, TrainingDiverged):
            print_on_first_process(trainer, fit_summary(trainer, pl_module, stopped=True).split("\n")[0])

    def resume_command(self) -> str:
        """The command that continues the run from the checkpoint of its stop."""
        if self.resumes_auto or self.command is None:
            return f"{self.same_command()} continues the run"
        return shlex.join(["flowvid", *self.command, "--resume", "auto"])

    def same_command(self) -> str:
        """The command that continues the run, in words."""
        return "the same command " + ("(it has resume: auto)" if self.resumes_auto else "with --resume auto")


def print_on_first_process(trainer: Trainer, text: str) -> None:
    """Print on the first process; the others know the same paths and stay quiet."""
    if trainer.is_global_zero:
        print(text, flush=True)


def print_fit_summary(trainer: Trainer, pl_module: LightningModule, stopped: bool, resume: str | None = None) -> None:
    print_on_first_process(trainer, fit_summary(trainer, pl_module, stopped, resume))


def fit_summary(trainer: Trainer, pl_module: LightningModule, stopped: bool, resume: str | None = None) -> str:
    """``trained to step N; saved CHECKPOINT, logs in FOLDER`` and the commands that take the checkpoint on
    (``resume`` first, when given); only the first part, saying so, when the run has no checkpoint. A run that
    saved none itself names the newest of its folder (the one it resumed from)."""
    saved = newest_checkpoint_saved(trainer)
    checkpoint = saved or newest_run_checkpoint_of(trainer)
    summary = f"{'stopped at' if stopped else 'trained to'} step {trainer.global_step}; "
    if saved:
        summary += f"saved {shown(saved)}"
    else:
        summary += f"saved no checkpoint; newest {shown(checkpoint)}" if checkpoint else "wrote no checkpoint"
    return summary_with_next_commands(trainer, pl_module, summary + skipped_data(trainer), checkpoint, resume)


def skipped_data(trainer: Trainer) -> str:
    """``; skipped N samples ...`` when the run met damaged data: said once more at its end, since a folder
    that is mostly broken would otherwise train on what is left with a warning at its start only."""
    skipped = trainer.callback_metrics.get("data/skipped_samples")
    if skipped is None or not float(skipped):
        return ""
    folders = " ".join(shown(folder) for folder in getattr(trainer.datamodule, "train_dirs", None) or [])
    return (f"; skipped {int(skipped)} samples of damaged data, counted each time they were read "
            f"(`flowvid data verify {folders or 'FOLDER'}` counts the damaged ones)")


def nothing_to_train(trainer: Trainer, pl_module: LightningModule) -> str:
    """What a resume of a run that had already reached its end did: nothing, from which checkpoint."""
    limit = f" (max_steps {trainer.max_steps})" if trainer.max_steps != -1 else ""
    checkpoint = newest_run_checkpoint_of(trainer)
    summary = f"{shown(trainer.default_root_dir)} is already at step {trainer.global_step}{limit}: nothing to train"
    if checkpoint:
        summary += f"; newest checkpoint {shown(checkpoint)}"
    # This resume's own log version is removed once it ends (``main``): the run's logs are the earlier ones.
    return summary_with_next_commands(trainer, pl_module, summary, checkpoint, None, logged=False)


def summary_with_next_commands(trainer: Trainer, pl_module: LightningModule, summary: str,
                               checkpoint: str | None, resume: str | None, logged: bool = True) -> str:
    """``summary``, the folder of the run's logs (its version, when this command ``logged``) and the commands
    that take ``checkpoint`` on."""
    logger = next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)
    if logger is not None:
        summary += f", logs in {shown(logger.log_dir if logged else logger.root_dir)}"
    if checkpoint is None:
        return summary
    commands = commands_taking_on(trainer, pl_module, checkpoint)
    if resume is not None:
        commands.insert(0, resume)
    if logger is not None:
        commands.append(f"tensorboard --logdir {shlex.quote(shown(logger.root_dir))}")
    return "\n".join([summary, "next:", *(f"  {command}" for command in commands)])


def commands_taking_on(trainer: Trainer, pl_module: LightningModule, checkpoint: str) -> list[str]:
    """What uses a checkpoint of ``pl_module``: a flow model's is exported and sampled (a LoRA run's adapters
    also alone), a VideoVAE's is a codec; other modules get none."""
    from flowvid.codecs.vae_training import VideoVAEModule, codec_commands
    from flowvid.lit.module import FlowModule
    from flowvid.nn.lora import LoRALinear

    ckpt = shlex.quote(shown(checkpoint))
    if isinstance(pl_module, VideoVAEModule):
        encode, save = codec_commands(shown(checkpoint), pl_module.vae.architecture())
        return [encode, f"python -c {shlex.quote(f'from flowvid.codecs import VideoVAE; {save}')}"]
    if not isinstance(pl_module, FlowModule):
        return []
    prompt = ' --prompt "..."' if any(isinstance(module, TextEncoder) for module in pl_module.modules()) else ""
    export_to = shlex.quote(shown(os.path.join(trainer.default_root_dir, "exported", "model.safetensors")))
    samples_to = shlex.quote(shown(os.path.join(trainer.default_root_dir, "samples")))
    commands = [f"flowvid export --ckpt {ckpt} --out {export_to}"]
    if any(isinstance(module, LoRALinear) for module in pl_module.modules()):
        adapters_to = shlex.quote(shown(os.path.join(trainer.default_root_dir, "exported", "adapters.safetensors")))
        commands.append(f"flowvid export --ckpt {ckpt} --out {adapters_to} --adapters-only")
    return [*commands, f"flowvid generate --ckpt {ckpt}{prompt} --out {samples_to}"]


def newest_checkpoint_saved(trainer: Trainer) -> str | None:
    """The checkpoint this run saved last: its ``RunCheckpoint``'s (what ``resume: auto`` and ``--ckpt RUN_DIR``
    take) when that saved one, else another ``ModelCheckpoint``'s; None when the run saved none."""
    callbacks = sorted(trainer.checkpoint_callbacks, key=lambda callback: not isinstance(callback, RunCheckpoint))
    # The last checkpoint a ModelCheckpoint wrote in this process (unlike best_model_path, not restored on resume).
    saved = [callback._last_checkpoint_saved for callback in callbacks if isinstance(callback, ModelCheckpoint)]
    return next((path for path in saved if path), None)


def newest_run_checkpoint_of(trainer: Trainer) -> str | None:
    """The newest checkpoint in the run's folder, else the one the run resumed from; None when neither."""
    found = list_checkpoints(checkpoint_dir_of(trainer)) if has_run_checkpoint(trainer) else []
    if found:
        return str(found[-1])
    resumed = trainer.ckpt_path
    return str(resumed) if resumed and os.path.isfile(resumed) else None


class FlowvidArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line: the usage (a hundred lines of options) and
    jsonargparse's report of every type a value might have had would bury the one that is wrong."""

    #: The arguments being parsed, for the recipe files a wrong key may come from, and the directory they
    #: are relative to (jsonargparse parses a recipe from within the recipe's own directory).
    command_line: list[str] = []
    launch_directory: str = "."

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.exit_on_error and not debug_mode_active():  # else a nested parser's caller reports it
            reporting = getattr(ex, "subcommand_parser", None) or self
            prog = reporting.prog.replace(" [options]", "")
            if required := REQUIRED_OF_SUBCOMMAND.fullmatch(message.strip()):  # `flowvid fit` without a recipe
                prog = f"{prog} {required['subcommand']}"
                keys = required["keys"].replace(f"{required['subcommand']}.", "")
                text = f"{keys} must be given: give a recipe, --config RECIPE.yaml (recipes/ holds examples)"
            else:
                options = [option.lstrip("-") for option in reporting._option_string_actions]
                recipes = read_recipes(config_files(self.command_line), self.launch_directory)
                text = one_line_error(message, recipes, options)
            print(f"{prog}: error: {text} (options: {prog} --help)", file=sys.stderr)
            self.exit(2)
        super().error(message, ex)

    def refuse(self, text: str) -> NoReturn:
        """Stop with one line about a command the parser accepts but that would not do what it says."""
        print(f"{self.prog.replace(' [options]', '')}: error: {text}", file=sys.stderr)
        self.exit(2)


#: The main parser's report of a subcommand's required keys, such as ``fit.data, fit.model``.
REQUIRED_OF_SUBCOMMAND = re.compile(r"the following arguments are required: "
                                    r"(?P<keys>(?P<subcommand>\w+)\.[\w.]+(?:, (?P=subcommand)\.[\w.]+)*)")
#: Lines of jsonargparse's report of a union that tell nothing about the mistake.
UNION_REPORT_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
                      "Expected a <class 'NoneType'>")
PARSER_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)')
GIVEN_CLASS = re.compile(r"Problem with given class_path '([^']+)':")
NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
NOT_ACCEPTED_BY_SUBCOMMAND = re.compile(r"Subcommand '[^']+' does not accept option '([^']+)'")
UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
NOT_AN_IMPORT_PATH = re.compile(r"Expected a dot import path string: (\S+)")
NO_SUCH_NAME = re.compile(r"module '([^']+)' has no attribute '([^']+)'")


def one_line_error(message: str, recipes: dict[str, Any], options: list[str] = ()) -> str:
    """jsonargparse's error as ``key: what is wrong``; an unknown key also says which of the ``recipes`` (file
    name: content, in command-line order) has it (none: the command line gave it) and the option it likely
    misspells (of the class's arguments, or of ``options``, the reporting parser's)."""
    keys, owner, error = _innermost_error(message)
    unknown_key = True
    if match := NOT_ACCEPTED.fullmatch(error):
        keys += match[1].split(".")
        error += f" by {owner}{_did_you_mean_in_class(match[1], owner)}"
    elif match := NOT_ACCEPTED_BY_SUBCOMMAND.fullmatch(error):
        keys = match[1].split(".")
        error += did_you_mean(match[1], options)
    elif match := UNRECOGNIZED.match(error):
        return _unrecognized(match[1], keys, options)
    elif match := NO_SUCH_NAME.fullmatch(error):  # a class_path naming a class (or module) that is not there
        unknown_key = False
        keys = [*(keys[:-1] if keys[-1:] == ["init_args"] else keys), "class_path"]
        error = _no_such_name(match[1], match[2])
    else:  # a wrong value: a recipe holding the key may not be where the value came from
        unknown_key = False
        if (match := NOT_AN_IMPORT_PATH.fullmatch(error)) and (instead := class_path_for(match[1])):
            error = instead
    if not keys:
        return error
    path = ".".join(keys)
    if classless := _init_args_without_a_class(recipes, keys):
        recipe, why = classless
        return f"{path} in {recipe}: {error}; {why}"
    found_in = [name for name, recipe in recipes.items() if unknown_key and _has_key(recipe, keys)]
    where = f" in {found_in[-1]}" if found_in else ""
    return f"{path}{where}: {error}"


def _unrecognized(option: str, keys: list[str], options: list[str]) -> str:
    """jsonargparse's report of an option it could not place, with the option as given: within a key it
    names only the rest of the option (``--0.init_args.x=3`` of ``--trainer.callbacks.0.init_args.x=3``)."""
    if not keys:
        return f"unrecognized arguments: {option}{did_you_mean(option.lstrip('-'), options)}"
    owner = keys[:-1] if keys[-1] == "init_args" else keys  # the init_args of the class tried, not of the option
    given = f"--{'.'.join(owner)}.{option.lstrip('-')}"
    text = f"unrecognized arguments: {given}"
    if option.lstrip("-").partition(".")[0].isdigit():  # a list's item chosen by its position
        listed = ".".join(owner)
        text += (f"; an option cannot change one of the items {listed} lists: give the whole list, changed, in an "
                 f"overlay (a later --config's {listed} replaces the list); --{listed}+=... adds an item, it does "
                 "not edit one")
    return text


def _no_such_name(module: str, name: str) -> str:
    """A class_path's missing part, with the name of ``module`` it likely misspells."""
    try:
        names = [held for held in dir(importlib.import_module(module)) if not held.startswith("_")]
    except ImportError:
        names = []
    return f"{module}.{name}: module {module!r} has no {name!r}{did_you_mean(name, names)}"


def _init_args_without_a_class(recipes: dict[str, Any], keys: list[str]) -> tuple[str, str] | None:
    """The recipe whose ``init_args`` of a class key along ``keys`` met no class, and why: it sets them without
    a ``class_path`` of its own and comes before the recipe that chooses the class (an overlay given first),
    or after one that sets the key to null. None when no recipe does either."""
    names = list(recipes)
    classes = [keys[:end] for end in range(1, len(keys) + 1) if end == len(keys) or keys[end] == "init_args"]
    for key in classes:
        setters = [index for index, recipe in enumerate(recipes.values())
                   if _has_key(recipe, [*key, "init_args"]) and not _has_key(recipe, [*key, "class_path"])]
        if not setters:
            continue
        setter, name = names[setters[0]], ".".join(key)
        if later := [later for later in names[setters[0]:] if _has_key(recipes[later], [*key, "class_path"])]:
            return setter, (f"it sets {name}.init_args before {later[0]} chooses {name}.class_path: give "
                            f"--config {setter} after --config {later[0]}")
        if nulls := [earlier for earlier in names[:setters[0]] if _value(recipes[earlier], key) is None]:
            return setter, (f"{nulls[-1]} sets {name} to null, so these init_args have no class_path or other "
                            f"settings to join: give {name} in full")
    return None


def _innermost_error(message: str) -> tuple[list[str], str | None, str]:
    """The key, the class that owns it and the first error in jsonargparse's indented report: a key's
    error nests the errors of its class's keys, and a union's lists those of each type it tried."""
    headers: list[tuple[int, list[str], str | None]] = []
    found: list[tuple[list[str], str | None, str]] = []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ")
        if not text or text.startswith(UNION_REPORT_NOISE):
            continue
        indent = len(line) - len(text)
        while headers and headers[-1][0] >= indent:
            headers.pop()
        if key := PARSER_KEY.fullmatch(text):
            headers.append((indent, key[1].split("."), None))
            text = key[2]  # a key's own error may follow it on the same line
        elif given := GIVEN_CLASS.fullmatch(text):
            headers.append((indent, ["init_args"], given[1]))
            text = ""
        if text:
            owners = [owner for _, _, owner in headers if owner]
            found.append(([key for _, keys, _ in headers for key in keys], (owners or [None])[-1], text))
    if not found:
        return [], None, " ".join(message.split())
    # A union (``trainer.strategy: str | Strategy``, a logger, the plugins' classes) given a class's init_args
    # fails first as the union's other types; the class's own error says what is wrong.
    return next((error for error in found if not OTHER_UNION_TYPE.fullmatch(error[2])), found[0])


#: jsonargparse's errors for a value that is not of one of the types a union tried, which it reports for each.
OTHER_UNION_TYPE = re.compile(r"Expected a <class '[^']+'>|Import path \S+ does not correspond to a subclass of \w+")


def _did_you_mean_in_class(option: str, owner: str | None) -> str:
    try:
        accepted = accepted_arguments(imported(owner)) if owner else []
    except (ImportError, AttributeError, ValueError, TypeError):  # a class this cannot look into: no guess
        return ""
    return did_you_mean(option, accepted)


def config_files(args: list[str]) -> list[str]:
    """The recipes ``--config``/``-c`` name in ``args``, in order."""
    return [file for _, file in configs_at(args)]


def configs_at(args: list[str]) -> list[tuple[int, str]]:
    """Each recipe ``--config``/``-c`` names in ``args``, with the position of its option."""
    found = []
    for position, arg in enumerate(args):
        if arg.startswith("--config="):
            found.append((position, arg.partition("=")[2]))
        elif arg in ("--config", "-c") and position + 1 < len(args):
            found.append((position, args[position + 1]))
    return found


#: The callbacks that decide which weights train or where they start. A ``--config`` whose ``callbacks:``
#: list replaces an earlier one's drops them without a word, and the run still trains, only something else:
#: without ``LoRA`` every weight trains (at the adapters' learning rate), without ``InitFromExport`` the model
#: starts from its initialisation. Other callbacks, ``Freeze`` included, may be replaced on purpose, as an
#: overlay that trains through adapters replaces the ``Freeze`` of the recipe before it.
WEIGHT_CALLBACKS = ("flowvid.lit.finetune.LoRA", "flowvid.lit.finetune.InitFromExport")


@contextlib.contextmanager
def refused_by(parser: FlowvidArgumentParser) -> Iterator[None]:
    """A ``ValueError`` of a check of the command line as the parser's one-line error."""
    try:
        yield
    except ValueError as mistake:
        parser.refuse(str(mistake))


def check_overlay_order(recipes: dict[str, Any], final_callbacks: Any) -> None:
    """Refuse overlays given in an order that drops one of ``WEIGHT_CALLBACKS``: an overlay (a config that
    leaves the model's class to an earlier one) lists it in ``trainer.callbacks``, a later config's list
    replaces that list, and the parsed config no longer has it. A recipe that chooses the model is left out:
    its callbacks are there to be replaced (an export's ``config.yaml`` lists those of the run that made it)."""
    kept = {_class_path_of(callback) for callback in _as_list(final_callbacks)}
    names = list(recipes)
    for index, name in enumerate(names):
        replacing = [later for later in names[index + 1:] if _has_key(recipes[later], ["trainer", "callbacks"])]
        if _has_key(recipes[name], ["model", "class_path"]) or not replacing:
            continue
        listed = {_class_path_of(callback) for callback in _as_list(_value(recipes[name], ["trainer", "callbacks"]))}
        if dropped := [path for path in WEIGHT_CALLBACKS if path in listed - kept]:
            later, short = replacing[-1], dropped[0].rpartition(".")[2]
            raise ValueError(f"{later} replaces the trainer.callbacks list of {name}, so the run would train "
                             f"without its {dropped[0]}: give --config {name} after --config {later}, or add "
                             f"{short} to the callbacks of {later}")


def _as_list(callbacks: Any) -> list[Any]:
    """A ``callbacks`` value as a list: one callback may stand alone, and null or MISSING lists none."""
    if callbacks is None or callbacks is MISSING:
        return []
    return list(callbacks) if isinstance(callbacks, list) else [callbacks]


def _class_path_of(callback: Any) -> str | None:
    """A callback's ``class_path``; a short name of one of ``WEIGHT_CALLBACKS`` (``LoRA``) as its full one."""
    class_path = callback if isinstance(callback, str) else (callback or {}).get("class_path")
    if isinstance(class_path, str) and "." not in class_path:
        return next((path for path in WEIGHT_CALLBACKS if path.rpartition(".")[2] == class_path), class_path)
    return class_path


def check_options_after_configs(args: list[str], recipes: dict[str, Any]) -> None:
    """Refuse an option given before a ``--config`` (of ``recipes``, read from ``args``) that sets the same
    key: the later config wins, so the option would be dropped without a word."""
    configs = configs_at(args)
    for position, arg in enumerate(args):
        later = [file for at, file in configs if at > position]
        if not arg.startswith("--") or arg.startswith("--config") or not later:
            continue
        key, equals, value = arg[2:].partition("=")
        value = value if equals else (args[position + 1] if position + 1 < len(args) else "")
        for leaf, leaf_value in _option_leaves(key, value):
            setting_key = leaf.removesuffix("+")  # `callbacks+=` adds to a list that a later config replaces
            for file in later:
                if (setting := _value(recipes[file], setting_key.split("."))) is not MISSING:
                    raise ValueError(f"--{leaf}{'=' if equals else ' '}{leaf_value} comes before --config {file}, "
                                     f"whose {setting_key}: {_shown_value(setting)} replaces it: give options after "
                                     "the configs")


def _option_leaves(key: str, value: str) -> list[tuple[str, str]]:
    """The keys an option sets: its own, or each one of a mapping it is given (``--model '{"init_args": ...}'``,
    as ``nulls_as_mappings`` writes a null one)."""
    try:
        mapping = json.loads(value)
    except ValueError:
        return [(key, value)]
    if not isinstance(mapping, dict) or not mapping:
        return [(key, value)]
    return [leaf for name, nested in mapping.items() for leaf in _option_leaves(f"{key}.{name}", json.dumps(nested))]


def _shown_value(value: Any) -> str:
    """A recipe's value as YAML on one line, cut short when long."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def read_recipes(files: list[str], directory: str) -> dict[str, Any]:
    """Each recipe file's content by its name as given (relative to ``directory``); None where unreadable."""
    recipes = {}
    for file in files:
        try:
            recipes[file] = yaml.safe_load(Path(directory, file).read_text())
        except (OSError, yaml.YAMLError):
            recipes[file] = None
    return recipes


def _has_key(recipe: Any, keys: list[str]) -> bool:
    return _value(recipe, keys) is not MISSING


#: What ``_value`` gives for a key a recipe does not hold.
MISSING = object()


def _value(recipe: Any, keys: list[str]) -> Any:
    """The value a recipe's content gives the nested key, or MISSING. The key may leave out a class's
    ``init_args``, as an option may (``--model.lr``)."""
    node = recipe
    for key in keys:
        if isinstance(node, dict) and key not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or key not in node:
            return MISSING
        node = node[key]
    return node


#: The help of the checkpoint options, as flowvid reads them (``before_fit``, ``before_validate``), in place
#: of Lightning's, which offers names flowvid refuses (``UNSUPPORTED_CHECKPOINT_NAMES``) and no run directory.
CHECKPOINT_OPTION_HELP = {
    "fit": {
        "resume": "'auto' continues from the newest readable checkpoint in <trainer.default_root_dir>/checkpoints "
                  "(written by the recipe's RunCheckpoint), or starts fresh when there is none; 'none' starts "
                  "fresh; a checkpoint file, or a run directory for its newest checkpoint, continues from it. "
                  "Not with --ckpt_path",
        "ckpt_path": "The checkpoint to continue from: a checkpoint file, or a run directory for its newest "
                     "checkpoint (as --resume PATH); 'last' is the newest of this run's checkpoints (as --resume "
                     "auto). Not with --resume. A flowvid export is no run to continue: the recipe's "
                     "InitFromExport starts from one",
    },
    "validate": {
        "resume": "What to validate when --ckpt_path is not given (a recipe's resume: auto is read here too): "
                  "'auto' the newest readable checkpoint in <trainer.default_root_dir>/checkpoints; a checkpoint "
                  "file, or a run directory for its newest checkpoint; a flowvid export, as --ckpt_path takes one; 'none', or 'auto' finding no checkpoint, "
                  "the model as initialised (for a recipe with InitFromExport, its export)",
        "ckpt_path": "What to validate: a checkpoint file; a run directory (its newest readable checkpoint); "
                     "'last' (the newest checkpoint the recipe's RunCheckpoint wrote); or a flowvid export (its "
                     ".safetensors file or its folder), loaded into the recipe's model. Without it, --resume "
                     "chooses",
    },
}

#: What each name of Lightning's ``ckpt_path`` that flowvid does not take would have asked for.
UNSUPPORTED_CHECKPOINT_NAMES = {
    "best": "the best checkpoint of a fit earlier in the same process, which a flowvid command never has "
            "(RunCheckpoint keeps the newest steps, not the best)",
    "hpc": "the checkpoint it saved on a SLURM signal, which flowvid does not look up by name",
    "registry": "a model from its online registry; flowvid downloads nothing",
}

#: What the same commands take instead.
CHECKPOINTS_TAKEN = {
    "fit": "a checkpoint file, a run directory (its newest checkpoint) or last; or --resume auto",
    "validate": "a checkpoint file, a run directory (its newest checkpoint), last, or a flowvid export "
                "(its .safetensors file or its folder)",
}


def check_checkpoint_name(subcommand: str, ckpt_path: Any) -> None:
    """Refuse a ``ckpt_path`` that Lightning reads as one of ``UNSUPPORTED_CHECKPOINT_NAMES`` before anything is
    built: ``best`` would fail only once the model is, ``hpc`` and ``registry`` ask for what flowvid does not do.
    A file of such a name is given as ``./best``."""
    if not isinstance(ckpt_path, str):
        return
    # Lightning's ``registry`` is any case, alone or as ``registry:MODEL[:VERSION]``.
    name = "registry" if re.fullmatch(r"registry(:.*)?", ckpt_path.lower()) else ckpt_path
    if name in UNSUPPORTED_CHECKPOINT_NAMES:
        taken = CHECKPOINTS_TAKEN.get(subcommand, "a checkpoint file")
        raise ValueError(f"ckpt_path {ckpt_path} asks Lightning for {UNSUPPORTED_CHECKPOINT_NAMES[name]}; "
                         f"give {taken} (for a file so named: ./{ckpt_path})")


class FlowvidCLI(LightningCLI):
    """LightningCLI with a ``--resume`` argument (``auto``, ``none`` or a checkpoint path) and a ``--ckpt_path`` that
    takes a run directory, and for ``validate`` an export."""

    #: The folders the run will write to that did not exist when its trainer was built.
    new_folders: list[str] = []
    #: The parsed config, kept to name the key of an argument a class refuses while it is built.
    parsed: dict[str, Any] = {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--resume", type=str | None, default=None,
            help="'auto' continues from the newest checkpoint in <trainer.default_root_dir>/checkpoints "
                 "(or starts fresh when there is none), 'none' starts fresh, a path continues from that checkpoint",
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:
            action.help = CHECKPOINT_OPTION_HELP.get(subcommand, {}).get(action.dest, action.help)
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        command_line = list(sys.argv[1:] if args is None else args)
        # The main parser or a subcommand's may report an error; built with run=False, there are no subcommands.
        subcommand_parsers = getattr(self, "_subcommand_parsers", {})
        for reporting in (parser, *subcommand_parsers.values()):
            reporting.command_line = command_line
            reporting.launch_directory = os.getcwd()
        reporting = subcommand_parsers.get(command_line[0] if command_line else None, parser)
        recipes = read_recipes(config_files(command_line), os.getcwd())
        with refused_by(reporting):
            check_options_after_configs(command_line, recipes)
        super().parse_arguments(parser, args)
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        with refused_by(reporting):
            check_overlay_order(recipes, config.trainer.get("callbacks"))
            if self.config.get("subcommand"):
                check_checkpoint_name(self.config.subcommand, config.get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        """``ckpt_path`` is checked like ``resume``: a file that cannot be read is a one-line error, and the
        model stays the one the config describes, so that loading refuses a checkpoint of another model.
        (Lightning would put the checkpoint's hyperparameters over the config's without a word.)"""
        if not self.config.get("subcommand"):
            return
        settings = self.config[self.config.subcommand]
        ckpt_path = settings.get("ckpt_path")
        if self.config.subcommand == "fit":
            check_fit_continues_no_export(ckpt_path, settings.get("resume"))
        validating_an_export = self.config.subcommand == "validate" and export_named(ckpt_path) is not None
        if ckpt_path and Path(ckpt_path).is_file() and not validating_an_export:
            load_client_state(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """Files the codec and the text encoder will read must exist before any part of the model is built:
        jsonargparse builds the flow first, which at billions of parameters takes minutes and much memory."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        FlowvidCLI.parsed = config.as_dict()
        model_args = (config.get("model") or {}).get("init_args") or {}
        for part in ("codec", "text_encoder"):
            spec = model_args.get(part)
            if spec is None or not spec.get("class_path"):
                continue
            check_files = getattr(imported(spec.class_path), "check_files", None)
            if check_files is not None:
                check_files(**dict(spec.get("init_args") or {}))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from flowvid.lit.strategies import check_deepspeed_runs_here

        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]  # one callback may stand alone
        chose_a_bar = any(isinstance(callback, ProgressBar) for callback in configured)
        logger = self._get(self.config_init, "trainer", default={}).get("logger")
        trainer = super().instantiate_trainer(**kwargs)
        if logger in (None, True):  # Lightning's own TensorBoard logger
            without_placeholder_metric(trainer)
        FlowvidCLI.new_folders = folders_a_run_makes(trainer)
        check_deepspeed_runs_here(trainer.strategy)
        trainer.callbacks.append(LoopStarted())
        if not chose_a_bar:
            _use_step_progress_bar(trainer)
        return trainer

    def before_fit(self) -> None:
        settings = self.config_init[self.subcommand]
        resume = settings.get("resume")
        if resume is not None and settings.get("ckpt_path"):
            raise ValueError(f"give either resume ({resume!r}) or ckpt_path ({settings.ckpt_path!r}), not both")
        ckpt_path = settings.get("ckpt_path")
        if ckpt_path == "last" and has_run_checkpoint(self.trainer):
            resume = "auto"  # RunCheckpoint writes no last.ckpt: Lightning would start afresh among the run's
        elif ckpt_path and ckpt_path not in LIGHTNING_CHECKPOINT_NAMES:
            if not os.path.exists(ckpt_path):
                raise FileNotFoundError(f"ckpt_path {ckpt_path} does not exist")
            resume = ckpt_path  # a checkpoint, or a run directory for its newest one, as resume takes them
        if resume is not None:
            if resume == "auto" and not has_run_checkpoint(self.trainer):
                # A plain ModelCheckpoint writes into the logger's version_N folder, new on every restart.
                raise ValueError("resume: auto needs a flowvid.lit.checkpointing.RunCheckpoint in trainer.callbacks "
                                 "(it writes to <trainer.default_root_dir>/checkpoints, where auto looks); "
                                 "add one, or resume from a checkpoint path. A --config with a callbacks: list "
                                 "replaces the list of the configs before it: add to it with callbacks+: "
                                 "(or --trainer.callbacks+=...) instead")
            settings.ckpt_path = resolve_resume(checkpoint_dir_of(self.trainer), resume)
        if has_run_checkpoint(self.trainer):
            if settings.ckpt_path:
                check_no_later_checkpoints(checkpoint_dir_of(self.trainer), settings.ckpt_path)
            else:
                check_no_earlier_run(checkpoint_dir_of(self.trainer))
        config = self.resolved_config()
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunCheckpoint):
                callback.run_config = config
                callback.resuming_from = settings.ckpt_path
            if isinstance(callback, InitFromExport):  # ("last" with no checkpoint yet starts afresh)
                callback.resuming = settings.ckpt_path is not None and os.path.exists(settings.ckpt_path)
        # For fit only, and once the run is accepted.
        summary = FitSummary(FitSummary.command_line, resumes_auto=resume == "auto")
        self.trainer.callbacks.append(summary)
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunCheckpoint):
                callback.continued_by = f"{summary.same_command()} continues from there"

    def before_validate(self) -> None:
        """``--ckpt_path`` may name a run directory (its newest readable checkpoint is validated), ``last``
        (the newest of this run's) or an export (its weights are loaded into the configured model). Without
        it, ``resume`` (``auto`` in some recipes) picks the checkpoint, as it picks where ``fit`` goes on."""
        check_some_batch_is_validated(self.trainer)
        check_some_validation_data(self.datamodule)
        settings = self.config_init[self.subcommand]
        if settings.get("ckpt_path") == "last" and has_run_checkpoint(self.trainer):
            # RunCheckpoint writes no last.ckpt: Lightning would validate the model as initialised.
            settings.ckpt_path = newest_run_checkpoint(checkpoint_dir_of(self.trainer))
        export = export_named(settings.get("ckpt_path") or _named_path(settings.get("resume")))
        if export is not None:
            settings.ckpt_path = None  # Lightning reads checkpoints only
        elif settings.get("ckpt_path"):
            if os.path.isdir(settings.ckpt_path):
                settings.ckpt_path = str(resolve_checkpoint(settings.ckpt_path))
        else:
            resume = settings.get("resume")
            settings.ckpt_path = resolve_resume(checkpoint_dir_of(self.trainer), resume, validating=True)
            if settings.ckpt_path is None and resume not in (None, "none"):
                warnings.warn(f"resume: {resume} found no checkpoint in {checkpoint_dir_of(self.trainer)}: "
                              "validating the model as initialised", stacklevel=2)
            elif settings.ckpt_path is None:
                warn_of_unused_checkpoints(checkpoint_dir_of(self.trainer))
        self._load_exports_for_validation(export, settings.ckpt_path)

    def _load_exports_for_validation(self, export: Path | None, ckpt_path: str | None) -> None:
        """The export given as ``--ckpt_path`` is loaded as ``InitFromExport`` loads one (its codec and text
        encoder checked, every weight of the model in it). A recipe's own ``InitFromExport`` is validated
        when nothing else is given, and gives way to a checkpoint, as when ``fit`` resumes."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, InitFromExport):
                callback.resuming = ckpt_path is not None or export is not None
        if export is not None:
            self.trainer.callbacks.append(InitFromExport(str(export)))

    def resolved_config(self) -> dict[str, Any]:
        """The full config of this command as plain data (what ``config.yaml`` holds)."""
        parser = self._parser(self.subcommand)
        return yaml.safe_load(parser.dump(self.config[self.subcommand], skip_none=False))


def folders_a_run_makes(trainer: Trainer) -> list[str]:
    """The folders ``trainer`` writes to (its run directory, checkpoint folder, TensorBoard ``version_N``) that
    do not exist yet, deepest first."""
    folders = [trainer.default_root_dir]
    if has_run_checkpoint(trainer):
        folders.append(checkpoint_dir_of(trainer))
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            folders += [logger.root_dir, logger.log_dir]
    new = {os.path.abspath(folder) for folder in folders if "://" not in str(folder) and not os.path.exists(folder)}
    return sorted(new, key=lambda folder: folder.count(os.sep), reverse=True)


#: What a run writes before its first step, and nothing after a refusal needs: the logger's event file and the
#: config files.
SETUP_FILES = re.compile(r"events\.out\.tfevents\..*|config\.yaml|hparams\.yaml")


def remove_what_a_refused_run_made(folders: list[str]) -> None:
    """Remove the folders of ``folders`` (made by a run that was refused before its first step) that hold
    nothing but what ``SETUP_FILES`` matches: left behind, a refused run would take ``version_0`` of its logs,
    and the run that follows the fix would be ``version_1``."""
    for folder in folders:
        written = [name for _, _, names in os.walk(folder) for name in names]
        if os.path.isdir(folder) and all(SETUP_FILES.fullmatch(name) for name in written):
            shutil.rmtree(folder, ignore_errors=True)


def check_no_earlier_run(checkpoint_dir: str) -> None:
    """A fresh run must not write its checkpoints among an earlier run's: ``resume: auto``, ``export`` and
    ``generate --ckpt RUN_DIR`` take the newest step there, which could be the other run's."""
    earlier = list_checkpoints(checkpoint_dir)
    if earlier:
        raise ValueError(f"{checkpoint_dir} holds {len(earlier)} checkpoint(s) of an earlier run (newest: "
                         f"{Path(earlier[-1]).name}); continue it with --resume auto, or start afresh in another "
                         "--trainer.default_root_dir (or remove them)")


def newest_run_checkpoint(checkpoint_dir: str) -> str:
    """What ``ckpt_path: last`` names in a run whose checkpoints ``RunCheckpoint`` writes: the newest readable."""
    if not list_checkpoints(checkpoint_dir):
        raise FileNotFoundError(f"ckpt_path last: {checkpoint_dir} holds no checkpoint to validate; train first, "
                                "or give a checkpoint file or run directory with --ckpt_path")
    return str(resolve_checkpoint(checkpoint_dir))


def export_named(ckpt_path: str | None) -> Path | None:
    """The ``flowvid export`` file that ``ckpt_path`` names (the file, or the folder holding it), if it names one."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path)
    if path.suffix == ".safetensors" and path.is_file():
        return path
    return export_in(path)


def _named_path(resume: str | None) -> str | None:
    """``resume`` when it names a path, not ``auto`` or ``none``."""
    return None if resume in (None, "auto", "none") else resume


def check_fit_continues_no_export(ckpt_path: str | None, resume: str | None) -> None:
    """An export holds weights only, not the optimiser and step a run continues with: ``fit`` starts from one
    through ``InitFromExport``, as the fine-tuning recipes do."""
    for option, value in (("ckpt_path", ckpt_path), ("resume", resume)):
        if export_named(_named_path(value)) is not None:
            raise ValueError(f"{option} {value} is a flowvid export, which holds no run to continue: start from it "
                             "with a flowvid.lit.finetune.InitFromExport callback (path: the export), as "
                             "the recipes in recipes/finetune/ do")


def check_some_batch_is_validated(trainer: Trainer) -> None:
    """``limit_val_batches=0`` turns validation off (what it is for in ``fit``): Lightning's ``validate`` would
    then load the model, validate nothing and succeed without a word."""
    if trainer.limit_val_batches == 0:
        raise ValueError("trainer.limit_val_batches=0 validates no batch; give a number of batches, or a fraction "
                         "of them (--trainer.limit_val_batches 1.0 for all)")


def check_some_validation_data(datamodule: Any) -> None:
    """Without ``val_dir`` Lightning's ``validate`` finds no loader: it would validate nothing and succeed."""
    if getattr(datamodule, "val_dirs", None) == []:
        raise ValueError("data.init_args.val_dir is not set, so there is nothing to validate; give the validation "
                         "shards with --data.init_args.val_dir")


def warn_of_unused_checkpoints(checkpoint_dir: str) -> None:
    """``validate`` without a checkpoint measures the untrained model, even beside a run's checkpoints."""
    found = list_checkpoints(checkpoint_dir)
    if found:
        warnings.warn(f"validating the model as initialised, not one of the {len(found)} checkpoint(s) in "
                      f"{checkpoint_dir}: --ckpt_path {checkpoint_dir} (or --resume auto) validates "
                      f"the newest, {found[-1].name}", stacklevel=3)


def check_no_later_checkpoints(checkpoint_dir: str, resumed: str) -> None:
    """Resuming a run from one of its own checkpoints must not leave newer ones beside the new branch:
    ``resume: auto`` and ``keep_last_k`` would take them for this run's. Newer ones that cannot be read
    (what ``resume: auto`` passes over after a crash mid-write or a full disk) are set aside instead."""
    found = [path.resolve() for path in list_checkpoints(checkpoint_dir)]
    resumed_path = Path(resumed).resolve()
    if resumed_path not in found:
        return
    later = [path for path in found[found.index(resumed_path) + 1:] if not set_aside_if_unreadable(path)]
    if later:
        raise ValueError(f"{checkpoint_dir} holds {len(later)} checkpoint(s) newer than {resumed_path.name} "
                         f"({', '.join(path.name for path in later[:3])}): continuing from {resumed_path.name} "
                         "would leave them among the new ones, where resume: auto would take them; move them out "
                         "of the folder first, or continue from the newest with --resume auto")


def set_aside_if_unreadable(checkpoint: Path) -> bool:
    """Rename a checkpoint that cannot be read to ``<name>.unreadable``, out of the run's checkpoints, and say
    so; whether it was. Left in place it would block the step's new checkpoint, written beside it as
    ``step=N-v1.ckpt``, and ``keep_last_k`` would never remove it."""
    try:
        load_client_state(checkpoint)
    except CorruptCheckpointError as err:
        aside = checkpoint.with_name(checkpoint.name + UNREADABLE_SUFFIX)
        with contextlib.suppress(FileNotFoundError):  # another process of the run set it aside first
            os.replace(checkpoint, aside)
            rank_zero_warn(f"set aside {aside.name}, which cannot be read ({err}); the run continues "
                           f"from an earlier checkpoint and writes the steps after it again")
        return True
    return False


def _use_step_progress_bar(trainer: Trainer) -> None:
    """Lightning's default rich bar (the recipe chose none) becomes ``StepProgressBar``."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[index] = StepProgressBar()


#: How YAML spells null.
YAML_NULLS = ("null", "Null", "NULL", "~")


def nulls_as_mappings(args: list[str]) -> list[str]:
    """``--model.init_args.flow.init_args.text_width=null`` as ``--model '{"init_args": {"flow": ...}}'``.

    jsonargparse hands a value nested in a class's ``init_args`` to that class's own parser as the text
    ``--text_width=None``, which no ``int | None`` accepts; a mapping given one level up reaches it intact
    and merges with the recipe's other settings, as the dotted form does. Either spelling,
    ``--key=null`` or ``--key null``, is rewritten; every other argument is left as given.
    """
    rewritten: list[str] = []
    position = 0
    while position < len(args):
        arg = args[position]
        key, equals, value = arg.partition("=")
        spaced = not equals and position + 1 < len(args) and args[position + 1] in YAML_NULLS
        if key.startswith("--") and ".init_args." in key and (value in YAML_NULLS if equals else spaced):
            owner, _, path = key.partition(".init_args.")
            mapping: Any = None
            for name in reversed(["init_args", *path.split(".")]):
                mapping = {name: mapping}
            rewritten += [owner, json.dumps(mapping)]
            position += 1 if equals else 2
            continue
        rewritten.append(arg)
        position += 1
    return rewritten


def _first_cause(err: BaseException) -> BaseException:
    """The class's own error inside jsonargparse's long report of the union types it tried."""
    while _raised_in_jsonargparse(err):
        # A union (``str | Strategy``) chains only its first type's error, ``Expected a <class 'str'>``.
        tried = [_first_cause(error) for error in _union_errors(err)]
        own = next((error for error in tried if not _raised_in_jsonargparse(error)), err.__cause__)
        if own is None:
            break
        err = own
    return err


def _last_frame(err: BaseException) -> Any:
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame


def _raised_in_jsonargparse(err: BaseException) -> bool:
    frame = _last_frame(err)
    return frame is not None and f"{os.sep}jsonargparse{os.sep}" in frame.tb_frame.f_code.co_filename


def _union_errors(err: BaseException) -> list[BaseException]:
    """The errors of every type a jsonargparse union tried, which only the frame that raised it holds."""
    frame = _last_frame(err)
    tried = frame.tb_frame.f_locals.get("exceptions") if frame is not None else None
    return [error for error in tried or [] if isinstance(error, BaseException)]


#: What a shell reports for a process ended by SIGTERM (128 + 15): schedulers then know the run is not done.
SIGTERM_EXIT_STATUS = 143

#: Lightning's warnings that tell a flowvid user nothing to act on.
BENIGN_WARNINGS = (
    # The shard loaders deal every worker shards of its own, so their length holds with any number of workers.
    r"Your `IterableDataset` has `__len__` defined",
    # Lightning calling a torch API that torch has deprecated.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Frozen parts (a codec, a pretrained text encoder) stay in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # DeepSpeed's ZeRO calling torch collectives that torch has deprecated, at every step.
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip")


def _not_lightnings_ctrl_c_notice(record: logging.LogRecord) -> bool:
    # ``main`` says in its own line how a Ctrl-C ended the command.
    return "Detected KeyboardInterrupt, attempting graceful shutdown" not in record.getMessage()


def quiet_benign_messages() -> None:
    """Leave out of a run's output the warnings above, Lightning's advertisement for a cloud logger and its
    notice of a Ctrl-C. Calling it again adds nothing (the same filters are kept once)."""
    for message in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addFilter(_not_a_tip)
    logger.addFilter(_not_lightnings_ctrl_c_notice)


@warnings_for_the_console()
def main(argv: list[str] | None = None) -> int:
    """Run ``FlowvidCLI`` as ``flowvid fit|validate`` does; 2 for bad input found before training, 1 for a
    run stopped because it diverged, 143 for a run stopped by SIGTERM, 130 by Ctrl-C."""
    from flowvid.registry import load_plugins

    load_plugins()
    quiet_benign_messages()
    LoopStarted.started = False
    FlowvidCLI.new_folders = []
    FlowvidCLI.parsed = {}
    FitSummary.resumed_at_its_end = False
    FitSummary.command_line = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # rewritten where Lightning reads them, and relaunches other processes from
        sys.argv[1:] = nulls_as_mappings(sys.argv[1:])
    args = None if argv is None else nulls_as_mappings(argv)
    subcommand = " ".join((sys.argv[1:] if args is None else args)[:1])
    try:
        return _run_cli(args, subcommand)
    except BaseException as err:
        if not stopped_by_ctrl_c(err):
            raise
        if not LoopStarted.started:
            remove_what_a_refused_run_made(FlowvidCLI.new_folders)
        print(ctrl_c_message(subcommand), file=sys.stderr)
        return CTRL_C_EXIT_STATUS


def _run_cli(args: list[str] | None, subcommand: str) -> int:
    from flowvid.lit.strategies import finish_distributed

    try:
        FlowvidCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # FlowModule builds its optimiser and schedule itself (model.init_args); LightningCLI's
            # --optimizer would replace its parameter groups and --lr_scheduler would be ignored.
            auto_configure_optimizers=False,
            parser_class=FlowvidArgumentParser,
            parser_kwargs={"allow_abbrev": False},
            args=args,
        )
    except INPUT_ERRORS as err:
        if LoopStarted.started or os.environ.get("FLOWVID_TRACEBACK") or stopped_by_ctrl_c(err):
            raise
        remove_what_a_refused_run_made(FlowvidCLI.new_folders)
        print(f"flowvid {subcommand}: error: {with_its_setting(_first_cause(err), FlowvidCLI.parsed)}",
              file=sys.stderr)
        return 2
    except TrainingDiverged as err:  # an expected stop, which says what to change: no traceback
        if os.environ.get("FLOWVID_TRACEBACK"):
            raise
        finish_distributed()
        print(f"flowvid fit: error: {err}", file=sys.stderr)
        return 1
    except SIGTERMException as stopped:  # stopped after a step (RunCheckpoint saved it): not a finished run
        finish_distributed()
        return CTRL_C_EXIT_STATUS if getattr(stopped, "stopped_by", None) == "Ctrl-C" else SIGTERM_EXIT_STATUS
    if FitSummary.resumed_at_its_end:  # its new, empty log version would only push the next run's number up
        remove_what_a_refused_run_made(FlowvidCLI.new_folders)
    finish_distributed()
    return 0


def with_its_setting(err: BaseException, config: dict[str, Any]) -> str:
    """``err``'s message, its first word written as the recipe's key when a class of the recipe refused that
    argument in its constructor (``batch_size must be >= 1`` -> ``data.init_args.batch_size must be >= 1``),
    as jsonargparse names the keys it refuses."""
    message = str(err)
    refusing = _constructing_class(err)
    key = _key_of_class(config, refusing) if refusing is not None else None
    argument = message.split(" ", 1)[0]
    if key is None or argument not in accepted_arguments(refusing):
        return message
    return f"{key}.init_args.{message}"


def _constructing_class(err: BaseException) -> type | None:
    """The class whose ``__init__`` was running, innermost, when ``err`` was raised."""
    found, frame = None, err.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get("self") if frame.tb_frame.f_code.co_name == "__init__" else None
        found = type(owner) if owner is not None else found
        frame = frame.tb_next
    return found


def _key_of_class(config: Any, cls: type, key: str = "") -> str | None:
    """The key of ``config`` whose ``class_path`` builds ``cls`` (the first, depth first), else None."""
    if isinstance(config, dict):
        path = config.get("class_path")
        if isinstance(path, str) and _builds(path, cls):
            return key
        children = {name: value for name, value in config.items() if name != "class_path"}
    elif isinstance(config, list):
        children = {str(index): value for index, value in enumerate(config)}
    else:
        return None
    for name, value in children.items():
        found = _key_of_class(value, cls, f"{key}.{name}" if key else name)
        if found is not None:
            return found
    return None


def _builds(class_path: str, cls: type) -> bool:
    try:
        return imported(class_path) is cls
    except (ImportError, AttributeError, ValueError):
        return False


def stopped_by_ctrl_c(err: BaseException) -> bool:
    """Whether a Ctrl-C is what ended the command: a KeyboardInterrupt, or one anywhere in the chain of what
    came of it (Lightning exits with ``exit(1)`` after one; ``torch.save`` turns one into a RuntimeError
    when its zip writer closes, as when a second Ctrl-C comes while the stop's checkpoint is written)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
    return False


def ctrl_c_message(subcommand: str) -> str:
    """The one line that ends a command stopped by Ctrl-C (a second one in ``fit``, which saves nothing; the
    first saves the step in progress and ends through ``SIGTERMException``)."""
    if not LoopStarted.started:
        return f"flowvid {subcommand}: stopped by Ctrl-C before the run started"
    if subcommand == "fit":
        # A checkpoint being written is dropped whole: AtomicCheckpointIO renames only a complete file.
        return ("flowvid fit: stopped by Ctrl-C at once, without saving; the checkpoints saved before are "
                "intact")
    return f"flowvid {subcommand}: stopped by Ctrl-C"


if __name__ == "__main__":  # `python -m flowvid.lit.cli_support fit ...`; multi-device runs relaunch it
    sys.exit(main())
