"""The learned text encoder's vocabulary: `flowvid data vocabulary` lists the captions' words, a fit whose
captions the vocabulary mostly cannot read is refused before its first step, and unknown words are named."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml

from data_tools.cli import main as data_main
from flowvid.data import write_synthetic_dataset
from flowvid.data.manifest import new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, encode_sample
from flowvid.lit.cli_support import main as lightning_main
from flowvid.text import LearnedTextEncoder
from flowvid.text.vocabulary import coverage

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
    assert error.endswith(f'{VOCABULARY_OPTION} "$(flowvid data vocabulary {folder})"')
    assert not list(tmp_path.rglob("*.ckpt"))


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
    assert "'past', 'tree'" in warned and warned.endswith(f'"$(flowvid data vocabulary {mixed})"')


def test_the_first_unknown_words_are_named_in_one_warning_and_later_ones_only_counted():
    encoder = LearnedTextEncoder(width=16, max_length=12, depth=1, head_dim=8)
    with pytest.warns(UserWarning, match=r"2 word\(s\) unknown to its vocabulary became <unk> \('dog', 'runs'\)"):
        encoder(["a dog runs", "a red circle"])
    with mock.patch("warnings.warn") as warn:
        encoder(["a cat sleeps"])
    warn.assert_not_called()
    assert encoder.unknown_count == 4
