"""Import checkpoints of the reference implementation (apple/ml-starflow) into flowvid's layout.

The reference saves ``model.state_dict()`` of its ``Model``: ``blocks.{i}`` are its flow blocks in
data-to-noise order (the last one is the deep block) and ``learnable_self_denoiser`` its denoiser.
For a flow of the same architecture (RoPE, SOS token, final RMSNorm, GELU MLP, soft clip) the
parameters map one to one::

    blocks.{i<N-1}.*  -> shallow.{i}.*          blocks.{N-1}.* -> deep.*
    sos_embed         -> sos                    proj_txt       -> proj_text
    final_norm        -> norm_out               proj_in, proj_out keep their names
    attn_blocks.{j}.attention.norm -> layers.{j}.norm_attn    attention.qkv / .proj -> attn.qkv / .proj
    attn_blocks.{j}.mlp.norm       -> layers.{j}.norm_mlp     mlp.main.0 / .2       -> mlp.fc / .proj

Buffers the reference keeps only for compatibility (``attn_mask``, ``var``, RoPE tables) are dropped.

The two implementations lay out their rotary embeddings differently, and the import makes up for it in
the query and key rows of every ``qkv`` projection (``rotary_layout``), so that the video part of the
imported flow computes what the reference's computes:

* a head's first spatial rotation pairs turn with the column in flowvid and with the row in the
  reference: the two groups of pairs trade places;
* in a flipped (right-to-left) block flowvid rotates a slot by the position of the token it holds, the
  reference by the position of the token natural order puts there, i.e. by the mirrored position: the
  angles between two slots have opposite signs, so each pair's second query and key component changes
  sign (conjugating both leaves the scores as the opposite angles make them).

What no weights can make up for: the reference also rotates its text positions (along the time axis)
and reads the text causally and unmasked, where flowvid leaves text unrotated and lets the text tokens
see each other (padding hidden). An imported text-conditioned deep block therefore starts close to the
reference's but not equal to it; fine-tune it before relying on its samples or likelihoods.

The reference denoiser is not converted: flowvid's ``CausalDenoiser`` normalises its output and
windows its attention differently, so its weights would not mean the same thing; train a denoiser
on the imported flow instead (``recipes/finetune/custom_shards.yaml``, ``train: denoiser``).

Anything else in the file (features flowvid's blocks do not have, such as learned position
embeddings, AdaLN or QK-norm) is an error, never silently dropped.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from flowvid.cli import HelpFormatter, exit_statuses
from flowvid.files import read_torch_file

#: Wrappers a training script may have put around the reference model (DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Reference buffers that hold nothing a model needs.
DEPRECATED_BUFFERS = re.compile(r"^(var|feat_rope(_gen)?\.freqs_(cos|sin)|blocks\.\d+\.attn_mask)$")
DENOISER_PREFIX = "learnable_self_denoiser."

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "attention.norm.": "norm_attn.",
    "attention.qkv.": "attn.qkv.",
    "attention.proj.": "attn.proj.",
    "mlp.norm.": "norm_mlp.",
    "mlp.main.0.": "mlp.fc.",
    "mlp.main.2.": "mlp.proj.",
}
_BLOCK_RENAMES = {"sos_embed": "sos", "proj_txt.": "proj_text.", "final_norm.": "norm_out.", "proj_in.": "proj_in.",
                  "proj_out.": "proj_out."}


@dataclass
class ReferenceImport:
    """The flow's weights in flowvid's names, and what was deliberately left behind."""

    flow: dict[str, torch.Tensor]
    names: dict[str, str] = field(default_factory=dict)  # flowvid's name -> the reference's
    dropped_buffers: list[str] = field(default_factory=list)
    denoiser_keys: list[str] = field(default_factory=list)


def load_reference_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The reference ``.pth`` state dict, read with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: a sharded (FSDP / torch.distributed.checkpoint) reference "
                         "checkpoint; convert it to one file with torch.distributed.checkpoint.format_utils first")
    if not path.exists():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    state = read_torch_file(path, "reference checkpoint")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for name, tensor in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        stripped[name] = tensor
    return stripped


def check_rotary_split(head_dim: int) -> None:
    """The reference turns 8 pairs of a head with the frame (when it has text) and splits the rest evenly
    between the two spatial axes; flowvid's split (``rope_pair_split``) must be the same for the weights to
    mean the same thing."""
    from flowvid.nn.rope import rope_pair_split

    pairs = head_dim // 2
    theirs = ((pairs - 8) // 2, (pairs - 8) // 2, 8) if head_dim % 4 == 0 and pairs > 8 else None
    ours = rope_pair_split(head_dim)
    if theirs != ours:
        raise ValueError(f"head_dim {head_dim}: flowvid turns its rotation pairs as (column, row, frame) = {ours}, the "
                         f"reference as (row, column, frame) = {theirs or 'an uneven split'}; weights convert "
                         "exactly only where the two agree (head_dim 64)")


def rotary_layout(qkv: torch.Tensor, head_dim: int, flipped: bool) -> torch.Tensor:
    """A fused ``qkv`` weight (3W, ...) or bias (3W,) with the query and key rows moved from the reference's
    rotary layout to flowvid's (see the module's docstring); the map is its own inverse."""
    from flowvid.nn.rope import rope_pair_split

    columns, rows, _ = rope_pair_split(head_dim)
    width = qkv.shape[0] // 3
    pairs = qkv[:2 * width].reshape(2, width // head_dim, head_dim // 2, 2, *qkv.shape[1:])
    order = [*range(columns, columns + rows), *range(columns), *range(columns + rows, head_dim // 2)]
    pairs = pairs[:, :, order].clone()
    if flipped:
        pairs[:, :, :, 1] *= -1
    return torch.cat([pairs.reshape(2 * width, *qkv.shape[1:]), qkv[2 * width:]])


def from_reference(state_dict: dict[str, torch.Tensor], head_dim: int = 64) -> ReferenceImport:
    """Rename a reference state dict into ``GlobalLocalFlow`` parameter names, with the query and key rows
    in flowvid's rotary layout (``rotary_layout``) for heads of ``head_dim``.

    Raises ValueError for keys that have no counterpart in flowvid (listing them), for reference
    models whose block order flowvid cannot reproduce and for head sizes whose rotations differ.
    """
    check_rotary_split(head_dim)
    state_dict = strip_wrappers(state_dict)
    blocks = sorted({int(m.group(1)) for m in map(_BLOCK_KEY.match, state_dict) if m})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"expected reference flow blocks blocks.0 .. blocks.N-1, found block indices {blocks}")
    if len(blocks) % 2:
        raise ValueError(
            f"the reference model has {len(blocks)} flow blocks; with an odd count its deep block reads frames in "
            "flipped order, while flowvid's deep block reads them in natural order (only even block counts, i.e. an "
            "odd number of shallow blocks, map exactly)"
        )
    deep = blocks[-1]
    result = ReferenceImport(flow={})
    unknown = []
    for name, tensor in state_dict.items():
        if DEPRECATED_BUFFERS.match(name):
            result.dropped_buffers.append(name)
            continue
        if name.startswith(DENOISER_PREFIX):
            result.denoiser_keys.append(name)
            continue
        match = _BLOCK_KEY.match(name)
        renamed = _rename_in_block(match.group(2)) if match else None
        if renamed is None:
            unknown.append(name)
            continue
        index = int(match.group(1))
        owner = "deep" if index == deep else f"shallow.{index}"
        if ".attn.qkv." in renamed:
            check_whole_heads(name, tensor, head_dim)
            # Shallow block i is flipped when an odd number of blocks follows it, in both implementations.
            tensor = rotary_layout(tensor, head_dim, flipped=(deep - index) % 2 == 1)
        result.flow[f"{owner}.{renamed}"] = tensor
        result.names[f"{owner}.{renamed}"] = name
    if unknown:
        raise ValueError(f"{len(unknown)} reference keys have no counterpart in flowvid's blocks "
                         f"(features flowvid does not implement?): {', '.join(sorted(unknown)[:8])}")
    return result


def check_whole_heads(name: str, qkv: torch.Tensor, head_dim: int) -> None:
    """A fused ``qkv`` tensor holds the query, key and value rows of whole heads of ``head_dim``."""
    if qkv.dim() == 0 or qkv.shape[0] % (3 * head_dim):
        raise ValueError(f"reference tensor {name} has shape {tuple(qkv.shape)}: a fused query, key and value "
                         f"projection needs 3 x a multiple of head_dim {head_dim} rows (--head-dim as trained)")


def reference_name(name: str, num_shallow: int) -> str:
    """The reference's name of flowvid's weight ``name`` (``from_reference``'s renaming, reversed)."""
    owner, _, rest = name.partition(".")
    if owner == "shallow":
        index, _, rest = rest.partition(".")
    else:
        index = str(num_shallow)
    layer = re.match(r"^layers\.(\d+)\.(.+)$", rest)
    renames = {new: old for old, new in (_LAYER_RENAMES if layer else _BLOCK_RENAMES).items()}
    tail = layer.group(2) if layer else rest
    for new, old in renames.items():
        if tail == new or (new.endswith(".") and tail.startswith(new)):
            tail = old + tail[len(new):]
            break
    return f"blocks.{index}." + (f"attn_blocks.{layer.group(1)}.{tail}" if layer else tail)


def _rename_in_block(name: str) -> str | None:
    layer = re.match(r"^attn_blocks\.(\d+)\.(.+)$", name)
    if layer:
        index, rest = layer.groups()
        for old, new in _LAYER_RENAMES.items():
            if rest.startswith(old):
                return f"layers.{index}.{new}{rest[len(old):]}"
        return None
    for old, new in _BLOCK_RENAMES.items():
        if name == old or (old.endswith(".") and name.startswith(old)):
            return new + name[len(old):]
    return None


def reference_flow_config(flow_state: dict[str, torch.Tensor], frame_size: tuple[int, int],
                          head_dim: int = 64) -> dict[str, Any]:
    """``GlobalLocalFlow`` keyword arguments for converted weights (``from_reference(...).flow``).

    Sizes are read from the tensors; ``frame_size`` (latent h, w) and ``head_dim`` cannot be, so they
    are given (the reference's default head size is 64).
    """
    shallow = sorted({int(k.split(".")[1]) for k in flow_state if k.startswith("shallow.")})

    def weight(name: str) -> torch.Tensor:
        if name not in flow_state:
            raise ValueError(f"the reference checkpoint has no {reference_name(name, len(shallow))}, which a flow "
                             f"block needs (flowvid's {name})")
        return flow_state[name]

    conditioned = sorted({k.rsplit(".", 2)[0] for k in flow_state if k.startswith("shallow.") and ".proj_text." in k})
    if conditioned:
        raise ValueError(f"{', '.join(conditioned)} see the text; flowvid conditions only the deep block "
                         "(the reference's cond_top_only)")

    def size(prefix: str) -> tuple[int, int]:
        width = weight(f"{prefix}.proj_in.weight").shape[0]
        depth = len({k.split(".")[2] for k in flow_state if k.startswith(f"{prefix}.layers.")})
        fc = weight(f"{prefix}.layers.0.mlp.fc.weight")
        if fc.shape[0] != 4 * width:
            raise ValueError(f"{prefix}: MLP hidden size {fc.shape[0]} is not 4 x width {width}")
        return width, depth

    shallow_sizes = {size(f"shallow.{i}") for i in shallow}
    if len(shallow_sizes) > 1:
        raise ValueError(f"the shallow blocks differ in (width, depth): {sorted(shallow_sizes)}")
    shallow_width, shallow_depth = shallow_sizes.pop()
    deep_width, deep_depth = size("deep")
    for width in (shallow_width, deep_width):
        if width % head_dim:
            raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    text = flow_state.get("deep.proj_text.weight")
    return {
        "latent_channels": int(weight("deep.sos").shape[-1]),
        "frame_size": [int(frame_size[0]), int(frame_size[1])],
        "num_shallow": len(shallow),
        "shallow_width": int(shallow_width),
        "shallow_depth": int(shallow_depth),
        "deep_width": int(deep_width),
        "deep_depth": int(deep_depth),
        "head_dim": int(head_dim),
        "text_width": int(text.shape[1]) if text is not None else None,
    }


def import_reference_flow(path: str | os.PathLike, frame_size: tuple[int, int], head_dim: int = 64):
    """A ``GlobalLocalFlow`` with the weights of a reference checkpoint (strict: every weight used)."""
    from flowvid.flows.global_local import GlobalLocalFlow

    imported = from_reference(load_reference_checkpoint(path), head_dim)
    config = reference_flow_config(imported.flow, frame_size, head_dim)
    flow = GlobalLocalFlow(**config)
    check_fits(imported.flow, flow.state_dict(), config["num_shallow"], where=str(path))
    flow.load_state_dict(imported.flow, strict=True)
    return flow


def check_fits(imported: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], num_shallow: int,
               where: str) -> None:
    """A ValueError naming, by the reference's names, the weights of ``imported`` that are missing or of
    another shape than in the flow of the sizes read from them (``expected``): torch's own error names
    flowvid's weights over several lines."""
    missing = [reference_name(k, num_shallow) for k in expected if k not in imported]
    reshaped = [f"{reference_name(k, num_shallow)} {tuple(imported[k].shape)} (expected {tuple(v.shape)})"
                for k, v in expected.items() if k in imported and imported[k].shape != v.shape]
    problems = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for label, names in (("missing", missing), ("different shape", reshaped)) if names]
    if problems:
        raise ValueError(f"the weights in {where} do not fit one flow of the sizes read from its blocks "
                         f"(proj_in, sos_embed, mlp): {'; '.join(problems)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowvid convert", description="Import an apple/ml-starflow checkpoint.",
                                     formatter_class=HelpFormatter,
                                     epilog=exit_statuses("the flow and its config are written"))
    parser.add_argument("--reference", required=True, help="the reference .pth state dict")
    parser.add_argument("--frame-size", type=int, nargs=2, required=True, metavar=("H", "W"),
                        help="latent tokens per frame side (480p Wan2.2 latents: 30 53)")
    parser.add_argument("--head-dim", type=int, default=64, help="channels per attention head")
    parser.add_argument("--out", required=True, help="the .safetensors file to write (flow.yaml goes beside it)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def main(argv: list[str]) -> int:
    """``flowvid convert --reference model.pth --frame-size H W [--head-dim 64] --out flow.safetensors``.

    Writes the flow's weights under ``flow.*`` (what ``flowvid.lit.finetune.InitFromExport`` loads,
    with ``strict: false`` for the parts the file lacks) and ``flow.yaml``, the flow's config to put
    under ``model.init_args.flow`` in a recipe.
    """
    from safetensors.torch import save_file

    from flowvid.cli import UserError
    from flowvid.export import check_export_path
    from flowvid.paths import write_atomically

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    config_path = out.parent / "flow.yaml"
    try:
        check_export_path(out)
        for existing in (p for p in (out, config_path) if p.exists() and not args.force):
            raise FileExistsError(f"{existing} exists; pass --force to overwrite it")
        flow = import_reference_flow(args.reference, tuple(args.frame_size), args.head_dim)
        config = reference_flow_config(dict(flow.state_dict()), tuple(args.frame_size), args.head_dim)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    tensors = {f"flow.{k}": v.contiguous() for k, v in flow.state_dict().items()}
    flow_config = {"class_path": "flowvid.flows.global_local.GlobalLocalFlow", "init_args": config}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, lambda path: save_file(tensors, str(path), metadata={"format": "flowvid",
                                                                                   "source": Path(args.reference).name}))
        write_atomically(config_path, lambda path: path.write_text(yaml.safe_dump(flow_config, sort_keys=False)))
    except OSError as err:  # a full disk, a folder without write permission
        raise UserError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"wrote {out} and {config_path}")
    if config["text_width"]:
        print("the deep block reads its text differently from the reference (text positions, causal reading): "
              "fine-tune it before relying on its samples or likelihoods")
    return 0
