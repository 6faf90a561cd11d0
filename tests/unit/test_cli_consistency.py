"""The commands read as one program: the docs' command lines use options that exist, every help states
the defaults and the exit statuses, and a concept has one option name everywhere."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

from data_tools import cli as data_cli
from flowvid import convert, demo, export, generate, score
from flowvid.cli import main
from flowvid.lit.cli_support import main as lightning_main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LIGHTNING_VERBS = ("fit", "validate")
#: A command line as the docs write it: ``flowvid VERB ...`` or the demo, perhaps started by torchrun.
COMMAND = re.compile(r"^(?:torchrun .*?--no-python )?((?:flowvid (?:fit|validate|plugins|data|generate|score|export|"
                     r"convert)|python -m flowvid\.demo)(?:\s.*)?)$")
#: What a synopsis writes instead of a value: ``DIR``, ``INPUT...``, ``[--fps F]``, ``fp32|bf16``.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*(\.\.\.)?$|^\.\.\.$|^\[|\]$|\|")


def documented_command_lines() -> list[tuple[str, str, bool]]:
    """``(where, command line, whole)`` of every command the docs show: whole in code blocks, perhaps a part
    of one in inline code (`flowvid generate --seed`)."""
    found = []
    for path in DOCS:
        for index, part in enumerate(re.split(r"^```.*$", path.read_text(encoding="utf-8"), flags=re.M)):
            whole = index % 2 == 1  # a code block: command lines, continued with a backslash
            if whole:
                lines = [line.strip().removeprefix("$ ") for line in re.sub(r"\\\n\s*", " ", part).splitlines()]
            else:
                lines = re.findall(r"`([^`\n]+)`", part)
            found += [(path.name, match.group(1), whole) for line in lines if (match := COMMAND.match(line))]
    return found


def words(command_line: str) -> list[str]:
    """The words of a command line up to a pipe, without its comment."""
    tokens = shlex.split(command_line, comments=True)
    return tokens[:tokens.index("|")] if "|" in tokens else tokens


def data_parser(verb: str) -> argparse.ArgumentParser:
    verbs = next(a for a in data_cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert verb in verbs.choices, f"`flowvid data {verb}` is no command; the data commands are {list(verbs.choices)}"
    return verbs.choices[verb]


@functools.cache
def lightning_options(verb: str) -> frozenset[str]:
    """The options ``flowvid fit|validate --help`` lists."""
    shown = io.StringIO()
    with mock.patch.object(sys, "argv", ["flowvid"]), contextlib.redirect_stdout(shown), \
            pytest.raises(SystemExit):
        lightning_main([verb, "--help"])
    return frozenset(re.findall(r"--[\w.]+\+?", shown.getvalue()))


def command_and_arguments(tokens: list[str]) -> tuple[argparse.ArgumentParser | str | None, list[str]]:
    """The parser of the command ``tokens`` run (a Lightning verb by name; None for a placeholder such as
    ``flowvid data VERB``) and the arguments it is given."""
    if tokens[:3] == ["python", "-m", "flowvid.demo"]:
        return demo.build_parser(), tokens[3:]
    verb, rest = tokens[1], tokens[2:]
    if verb in LIGHTNING_VERBS:
        return verb, rest
    if verb == "data":
        if not rest or PLACEHOLDER.search(rest[0]):
            return None, []
        return data_parser(rest[0]), rest[1:]
    parsers = {"generate": generate.build_parser, "score": score.build_parser, "export": export.build_parser,
               "convert": convert.build_parser, "plugins": lambda: argparse.ArgumentParser(prog="flowvid plugins")}
    return parsers[verb](), rest


def option_names(arguments: list[str]) -> list[str]:
    """The options among ``arguments``, as a synopsis writes them too: ``[--fps``, ``--image/--video``."""
    names = []
    for argument in arguments:
        for part in argument.strip("[]").split("/"):
            if part.startswith("--"):
                names.append(part.split("=")[0])
    return names


def unknown_options(parser: argparse.ArgumentParser | str, names: list[str]) -> list[str]:
    if isinstance(parser, str):  # Lightning: a class's own arguments (--model.init_args.lr) are not listed
        known = lightning_options(parser)
        return [name for name in names if name not in known and not name.startswith(("--model.", "--data."))]
    known = set(parser._option_string_actions)
    if parser.prog == "python -m flowvid.demo":  # the demo hands the options it does not take to `flowvid fit`
        known |= {name for name in names if name.startswith("--trainer.")} & lightning_options("fit")
    return [name for name in names if name not in known]


def parse_error(parser: argparse.ArgumentParser, arguments: list[str]) -> str | None:
    """What ``parser`` says of ``arguments`` when it refuses them, else None."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        try:
            if parser.prog == "python -m flowvid.demo":
                parser.parse_known_args(arguments)
            else:
                parser.parse_args(arguments)
        except SystemExit:
            return said.getvalue().strip()
    return None


@pytest.mark.parametrize("where, command_line, whole", documented_command_lines())
def test_a_documented_command_line_uses_options_the_command_takes(where, command_line, whole):
    parser, arguments = command_and_arguments(words(command_line))
    if parser is None:
        return
    unknown = unknown_options(parser, option_names(arguments))
    assert not unknown, f"{where}: `{command_line}` uses {unknown}, which the command does not take"
    # A whole command line, not a synopsis, is one the command runs: its values fit their options too.
    if whole and isinstance(parser, argparse.ArgumentParser) and not any(PLACEHOLDER.search(a) for a in arguments):
        refused = parse_error(parser, arguments)
        assert refused is None, f"{where}: `{command_line}` is refused: {refused}"


def test_the_docs_command_lines_are_found():
    whole = {tuple(words(line)[:3]) for _, line, is_whole in documented_command_lines() if is_whole}
    for command in [("flowvid", "generate"), ("flowvid", "score"), ("flowvid", "export"), ("flowvid", "convert")]:
        assert any(line[:2] == command for line in whole), command
    assert {("flowvid", "data", "fvd"), ("flowvid", "data", "from-videos"), ("flowvid", "fit")} <= \
        {line if line[1] == "data" else line[:2] for line in whole}


def argparse_commands() -> dict[str, argparse.ArgumentParser]:
    """Every command that argparse reads, by its name."""
    parsers = {"flowvid generate": generate.build_parser(), "flowvid score": score.build_parser(),
               "flowvid export": export.build_parser(), "flowvid convert": convert.build_parser(),
               "python -m flowvid.demo": demo.build_parser()}
    return parsers | {f"flowvid data {verb}": data_parser(verb) for verb in data_cli.VERBS}


def help_of(parser: argparse.ArgumentParser, option: str) -> str:
    action = parser._option_string_actions[option]
    return " ".join(parser._get_formatter()._get_help_string(action).split()) % {"default": action.default}


def has_a_default(default: object) -> bool:
    """Whether an option does something unless given: not a switch that is off, nor a setting left unset."""
    return default is not None and default is not False and default not in ({}, "", argparse.SUPPRESS)


def is_a_switch(action: argparse.Action) -> bool:
    """A ``--flag`` that turns something on or off (``--no-denoise``'s default True means "denoise", not "on")."""
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


@pytest.mark.parametrize("command", argparse_commands())
def test_every_option_that_has_a_default_says_which(command):
    parser = argparse_commands()[command]
    unsaid = [action.option_strings[0] for action in parser._actions
              if action.option_strings and has_a_default(action.default) and not is_a_switch(action)
              and "default" not in help_of(parser, action.option_strings[0])]
    assert not unsaid, f"`{command} --help` does not say the defaults of {unsaid}"


@pytest.mark.parametrize("command", argparse_commands())
def test_no_switch_states_a_default(command):
    parser = argparse_commands()[command]
    stated = [action.option_strings[0] for action in parser._actions
              if is_a_switch(action) and "(default:" in help_of(parser, action.option_strings[0])]
    assert not stated, f"`{command} --help` gives switches {stated} a default, which reads as the switch's state"


def test_a_default_is_shown_as_the_command_takes_it(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "sample i uses seed + i (default: 0)" in shown and "samples drawn together (default: 8)" in shown
    assert "(default: plain textured)" in help_of(data_parser("make-synthetic"), "--backgrounds")
    assert help_of(data_parser("from-videos"), "--workers").endswith("(default: one per CPU core, 4 at most)")


@pytest.mark.parametrize("command", [["generate"], ["score"], ["export"], ["convert"], ["plugins"],
                                     *(["data", verb] for verb in data_cli.VERBS)])
def test_every_command_help_says_what_its_exit_statuses_mean(command, capsys):
    try:
        main([*command, "--help"])
    except SystemExit:
        pass
    shown = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 when" in shown and "2 when the request cannot be done" in shown


@pytest.mark.parametrize("command, partly_failed", [(["generate"], "1 when some samples came out NaN"),
                                                    (["score"], "1 when no video could be scored"),
                                                    (["data", "verify"], "1 when a folder is damaged"),
                                                    (["data", "from-videos"], "1 when none is"),
                                                    (["data", "encode-latents"], "1 when none is")])
def test_a_command_that_can_partly_fail_says_so_with_status_1(command, partly_failed, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert partly_failed in " ".join(capsys.readouterr().out.split())


def test_an_option_of_several_commands_means_the_same_in_each():
    parsers = argparse_commands()
    for option in ("--device", "--weights", "--lora", "--lora-strength", "--seed", "--batch-size"):
        having = {name: parser._option_string_actions[option] for name, parser in parsers.items()
                  if option in parser._option_string_actions}
        if option in ("--device", "--weights", "--lora", "--lora-strength"):
            assert len({action.help for action in having.values()}) == 1, option
        assert len({action.default for action in having.values()}) == 1, (option, having)
    assert "--device" in parsers["flowvid data fvd"]._option_string_actions
    json_options = [(name, option) for name, parser in parsers.items() for option in parser._option_string_actions
                    if option.endswith("-args")]
    assert json_options and all(parsers[name]._option_string_actions[option].metavar == "JSON"
                                for name, option in json_options)


def test_the_demo_names_its_checkpoint_option_as_the_other_commands_do():
    parser = demo.build_parser()
    assert parser.parse_known_args(["--ckpt", "model.ckpt"])[0].checkpoint == Path("model.ckpt")
    assert parser.parse_known_args(["--checkpoint", "model.ckpt"])[0].checkpoint == Path("model.ckpt")
    for command in ("flowvid generate", "flowvid score", "flowvid export"):
        assert "--ckpt" in argparse_commands()[command]._option_string_actions
