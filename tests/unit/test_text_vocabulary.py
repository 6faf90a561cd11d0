"""The learned text encoder's vocabulary: `flowvid data vocabulary` lists the captions' words, or writes them
to a config that `flowvid fit` takes after the recipe; a fit whose captions the vocabulary mostly cannot read
is refused before its first step, and unknown words are named."""

from __future__ import annotations

import itertools
import json
import os
import string
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from test_scale_recipes import OWN_VIDEOS, PAPER_SCALE, fit_arguments, resolved

from data_tools.cli import main as data_main
from flowvid.data import write_synthetic_dataset
from flowvid.data.manifest import new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, encode_sample
from flowvid.lit.cli_support import main as lightning_main
from flowvid.text import LearnedTextEncoder
from flowvid.text.vocabulary import ALWAYS_KNOWN, coverage

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "shapes_t2v.yaml"
VOCABULARY_OPTION = "--model.init_args.text_encoder.init_args.vocabulary"
CAPTIONS = ["The dog runs across the field, chasing 3 balls!", "A CAFE\u0301 at night: rain in the street.",
            "Ein Hund läuft über die Wiese", "the dog sleeps"]


def write_clips(folder: Path, captions: list[str], per_shard: int = 2) -> str:
    """A raw shard folder of the demo recipe's clips (8 frames of 16 x 16), one per caption."""
    with ShardFolderWriter(folder, max_samples=per_shard) as writer:
        for index, caption in enumerate(captions):
            writer.write(encode_sample(f"clip{index:03d}", caption, {}, frames=np.zeros((8, 16, 16, 3), np.uint8)))
    write_manifest(folder, new_manifest("raw", {"frames": 8, "height": 16, "width": 16, "fps": 8.0},
                                        samples=writer.samples, num_shards=len(writer.shards), shards=writer.shards))
    return str(folder)


def vocabulary_command(capsys, *arguments: str) -> tuple[int, str, str]:
    status = data_main(["vocabulary", *arguments])
    shown = capsys.readouterr()
    return status, shown.out, shown.err


def fit(tmp_path: Path, train_dir: str, *arguments: str) -> int:
    with mock.patch.object(sys, "argv", ["flowvid"]):  # pytest's own arguments are not the CLI's
        return lightning_main(["fit", "--config", str(RECIPE), f"--trainer.default_root_dir={tmp_path / 'run'}",
                               f"--data.init_args.train_dir={train_dir}", "--data.init_args.val_dir=null",
                               *arguments])


def test_the_listed_words_given_as_the_vocabulary_on_the_command_line_make_every_caption_word_known(tmp_path, capsys):
    folder = write_clips(tmp_path / "clips", CAPTIONS)
    status, listed, _ = vocabulary_command(capsys, folder)
    assert status == 0
    words = json.loads(listed)
    assert words == sorted(words) and "dog" in words and "café" in words and "über" in words
    assert not {"3", ",", ":", "a", "in"} & set(words)  # the tokenizer knows digits, marks and template words anyway

    # As `--...vocabulary "$(flowvid data vocabulary DIR)"` hands it over: the output less its final newline.
    with mock.patch.object(sys, "argv", ["flowvid"]), pytest.raises(SystemExit):
        lightning_main(["fit", "--config", str(RECIPE), VOCABULARY_OPTION, listed.rstrip("\n"), "--print_config"])
    printed = capsys.readouterr().out
    given = yaml_vocabulary(printed)
    assert given == words
    encoder = LearnedTextEncoder(width=16, depth=1, head_dim=8, vocabulary=given)
    assert not coverage(encoder.tokenizer, CAPTIONS).unknown


def yaml_vocabulary(printed_config: str) -> list[str]:
    config = yaml.safe_load(printed_config[printed_config.index("# lightning.pytorch"):])
    return config["model"]["init_args"]["text_encoder"]["init_args"]["vocabulary"]


def test_min_count_leaves_out_rare_words_and_a_damaged_shard_is_read_up_to_its_damage(tmp_path, capsys):
    folder = write_clips(tmp_path / "clips", CAPTIONS)
    assert json.loads(vocabulary_command(capsys, folder, "--min-count", "2")[1]) == ["dog", "the"]
    second_shard = sorted(Path(folder).glob("*.tar"))[1]
    second_shard.write_bytes(second_shard.read_bytes()[:1500])  # cut inside its first sample's clip
    status, listed, said = vocabulary_command(capsys, folder)
    assert status == 1 and "damaged shard" in said and second_shard.name in said
    assert "field" in json.loads(listed) and "hund" not in json.loads(listed)


def test_a_fit_whose_captions_the_vocabulary_mostly_cannot_read_is_refused_before_its_first_step(tmp_path, capsys):
    folder = write_clips(tmp_path / "clips", CAPTIONS)
    assert fit(tmp_path, folder, "--trainer.max_steps=1") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("flowvid fit: error: ") and f"captions in {folder} are unknown" in error
    assert "'the', 'dog'" in error  # the most frequent first
    assert error.endswith(f"`flowvid data vocabulary {folder} --out vocabulary.yaml`, "
                          "then `--config vocabulary.yaml` after the recipe")
    assert not list(tmp_path.rglob("*.ckpt"))

    # What the error says to do makes the run start.
    assert vocabulary_command(capsys, folder, "--out", str(tmp_path / "vocabulary.yaml"))[0] == 0
    assert fit(tmp_path, folder, "--config", str(tmp_path / "vocabulary.yaml"), "--trainer.max_steps=1") == 0


def vocabulary_warnings(recorded: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in recorded if "unknown to the learned text encoder's vocabulary" in str(w.message)]


def test_the_demo_captions_pass_and_a_few_unknown_words_are_warned_of_with_the_same_fix(tmp_path, recwarn):
    write_synthetic_dataset(tmp_path / "shapes", num_videos=4, frames=8, size=16, val_videos=1)
    shapes = str(tmp_path / "shapes" / "train")
    assert fit(tmp_path / "demo", shapes, "--trainer.max_steps=1") == 0
    assert not vocabulary_warnings(recwarn)

    captions = ["a red circle moves left"] * 3 + ["a red circle moves left past a tree"]  # 2 of 23 words unknown
    mixed = write_clips(tmp_path / "mixed", captions)
    assert fit(tmp_path / "mixed_run", mixed, "--trainer.max_steps=1") == 0
    [warned] = vocabulary_warnings(recwarn)
    assert warned.startswith(f"9% of the words of the first 4 captions in {mixed}")
    assert "'past', 'tree'" in warned and warned.endswith(f"`flowvid data vocabulary {mixed} --out vocabulary.yaml`, "
                                                       "then `--config vocabulary.yaml` after the recipe")


def test_the_first_unknown_words_are_named_in_one_warning_and_later_ones_only_counted():
    encoder = LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8)
    with pytest.warns(UserWarning, match=r"2 word\(s\) unknown to its vocabulary became <unk> \('dog', 'runs'\)"):
        encoder(["a dog runs", "a red circle"])
    with mock.patch("warnings.warn") as warn:
        encoder(["a cat sleeps"])
    warn.assert_not_called()
    assert encoder.unknown_count == 4


def letter_words(count: int) -> list[str]:
    """``count`` distinct words of four letters, none of them a prompt template word."""
    words = ("".join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=4))
    return list(itertools.islice((word for word in words if word not in ALWAYS_KNOWN), count))


def test_the_vocabulary_file_sets_the_recipes_text_encoder_to_exactly_the_listed_words(tmp_path, capsys):
    # YAML reads an unquoted yes, no, on, off, null or true as no string: the file must keep them words.
    words = [*letter_words(20_000), "yes", "no", "on", "off", "null", "true", "café", "über"]
    folder = write_clips(tmp_path / "clips", [" ".join(words[start:start + 200]) for start in range(0, len(words), 200)],
                         per_shard=50)
    listed = json.loads(vocabulary_command(capsys, folder)[1])
    out = tmp_path / "configs" / "vocabulary.yaml"
    status, printed, said = vocabulary_command(capsys, folder, "--out", str(out))
    assert (status, printed) == (0, "") and str(out) in said
    assert listed == sorted(words) and not list(out.parent.glob("*.partial"))
    header = out.read_text(encoding="utf-8").split("\nmodel:")[0].splitlines()
    assert all(line.startswith("# ") for line in header)
    assert f"flowvid data vocabulary {folder} --min-count 1" in header[0]

    with mock.patch.object(sys, "argv", ["flowvid"]):
        config, alone = resolved(capsys, OWN_VIDEOS, out), resolved(capsys, OWN_VIDEOS)
    assert config["model"]["init_args"]["text_encoder"]["init_args"].pop("vocabulary") == listed
    assert alone["model"]["init_args"]["text_encoder"]["init_args"].pop("vocabulary") == []
    assert config == alone  # the file changes nothing else


def test_a_vocabulary_file_for_a_recipe_without_the_learned_text_encoder_is_refused(tmp_path, capsys):
    out = tmp_path / "vocabulary.yaml"
    assert vocabulary_command(capsys, write_clips(tmp_path / "clips", CAPTIONS), "--out", str(out))[0] == 0
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}  # the 480p recipe imports DeepSpeed
    done = subprocess.run([sys.executable, "-m", "flowvid.lit.cli_support", *fit_arguments((PAPER_SCALE, out))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert f"vocabulary in {out}: Option 'vocabulary' is not accepted by flowvid_plugins.text_encoders.T5TextEncoder" \
        in done.stderr

    without_text = tmp_path / "unconditional.yaml"
    recipe = yaml.safe_load(OWN_VIDEOS.read_text())
    recipe["model"]["init_args"]["text_encoder"] = None
    without_text.write_text(yaml.safe_dump(recipe))
    for configs, why in [((without_text, out), f"{without_text} sets model.init_args.text_encoder to null"),
                         ((out, OWN_VIDEOS), f"give --config {out} after --config {OWN_VIDEOS}")]:
        with mock.patch.object(sys, "argv", ["flowvid"]), pytest.raises(SystemExit) as stop:
            lightning_main(fit_arguments(configs))
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "error: model.init_args.text_encoder" in err and f" in {out}: " in err and why in err


def test_a_vocabulary_file_is_not_written_over_a_shard_folders_files(tmp_path, capsys):
    folder = write_clips(tmp_path / "clips", CAPTIONS)
    manifest = (Path(folder) / "manifest.json").read_bytes()
    status, _, said = vocabulary_command(capsys, folder, "--out", str(Path(folder) / "manifest.json"))
    assert status == 2 and "one of the inputs" in said
    assert (Path(folder) / "manifest.json").read_bytes() == manifest
    assert vocabulary_command(capsys, folder, "--out", folder)[0] == 2


def test_a_vocabulary_entry_that_is_no_string_is_refused_by_name():
    with pytest.raises(ValueError, match="vocabulary entries must be strings, got 3"):
        LearnedTextEncoder(width=16, depth=1, head_dim=8, vocabulary=["dog", 3])


def test_a_vocabulary_given_as_one_string_is_refused_rather_than_read_letter_by_letter():
    with pytest.raises(ValueError, match="must be a list of words, got the string 'dog cat'"):
        LearnedTextEncoder(width=16, depth=1, head_dim=8, vocabulary="dog cat")
