"""Import of reference (apple/ml-starflow) checkpoints: a reference-shaped state dict built here."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch

from flowvid.cli import UserError
from flowvid.convert import from_reference, import_reference_flow, main, reference_flow_config, rotary_layout
from flowvid.flows.global_local import GlobalLocalFlow
from flowvid.flows.permutations import Flip
from flowvid.nn.rope import rope_angles, rope_pair_split
from flowvid.testing import perturb_parameters

CHANNELS, TEXT = 3, 8
SHALLOW = [(64, 1)] * 3  # (width, layers) of the reference's blocks 0..2
DEEP = (128, 2)  # its last block
FLOW_CONFIG = dict(latent_channels=CHANNELS, frame_size=(4, 4), num_shallow=3, shallow_width=64, shallow_depth=1,
                   deep_width=128, deep_depth=2, head_dim=64, text_width=TEXT)


def reference_block(width: int, layers: int, text: bool) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one reference MetaBlock (RoPE, SOS, final norm, GELU MLP)."""
    shapes = {"sos_embed": (1, 1, CHANNELS), "proj_in.weight": (width, CHANNELS), "proj_in.bias": (width,),
              "proj_out.weight": (2 * CHANNELS, width), "proj_out.bias": (2 * CHANNELS,),
              "final_norm.weight": (width,), "attn_mask": (16 + 4, 16 + 4)}
    if text:
        shapes |= {"proj_txt.weight": (width, TEXT), "proj_txt.bias": (width,)}
    for j in range(layers):
        layer = f"attn_blocks.{j}"
        shapes |= {f"{layer}.attention.norm.weight": (width,), f"{layer}.attention.norm.bias": (width,),
                   f"{layer}.attention.qkv.weight": (3 * width, width), f"{layer}.attention.qkv.bias": (3 * width,),
                   f"{layer}.attention.proj.weight": (width, width), f"{layer}.attention.proj.bias": (width,),
                   f"{layer}.mlp.norm.weight": (width,), f"{layer}.mlp.norm.bias": (width,),
                   f"{layer}.mlp.main.0.weight": (4 * width, width), f"{layer}.mlp.main.0.bias": (4 * width,),
                   f"{layer}.mlp.main.2.weight": (width, 4 * width), f"{layer}.mlp.main.2.bias": (width,)}
    return shapes


def reference_state_dict(prefix: str = "module.") -> dict[str, torch.Tensor]:
    """What the reference's ``torch.save(model.state_dict())`` holds, saved from a DDP-wrapped model."""
    generator = torch.Generator().manual_seed(0)
    sizes = [*SHALLOW, DEEP]
    shapes = {}
    for index, (width, layers) in enumerate(sizes):
        last = index == len(sizes) - 1
        shapes |= {f"blocks.{index}.{k}": v for k, v in reference_block(width, layers, text=last).items()}
    shapes |= {"var": (16, CHANNELS), "feat_rope.freqs_cos": (20, 16), "feat_rope.freqs_sin": (20, 16),
               "learnable_self_denoiser.proj_in.weight": (32, CHANNELS),
               "learnable_self_denoiser.final_norm.weight": (32,)}
    return {prefix + name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def test_a_reference_state_dict_maps_with_no_missing_or_unexpected_keys():
    reference = reference_state_dict()
    imported = from_reference(reference)
    flow = GlobalLocalFlow(**FLOW_CONFIG)
    result = flow.load_state_dict(imported.flow, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(flow.deep.layers[1].mlp.fc.weight, reference["module.blocks.3.attn_blocks.1.mlp.main.0.weight"])
    assert torch.equal(flow.shallow[2].sos, reference["module.blocks.2.sos_embed"])
    assert torch.equal(flow.deep.norm_out.weight, reference["module.blocks.3.final_norm.weight"])
    assert torch.equal(flow.deep.proj_text.weight, reference["module.blocks.3.proj_txt.weight"])
    # Values stay as they were; only the query and key rows move to flowvid's rotary layout.
    qkv = reference["module.blocks.0.attn_blocks.0.attention.qkv.weight"]
    assert torch.equal(flow.shallow[0].layers[0].attn.qkv.weight[128:], qkv[128:])
    assert torch.equal(flow.shallow[0].layers[0].attn.qkv.weight, rotary_layout(qkv, 64, flipped=True))
    qkv = reference["module.blocks.1.attn_blocks.0.attention.qkv.bias"]
    assert torch.equal(flow.shallow[1].layers[0].attn.qkv.bias, rotary_layout(qkv, 64, flipped=False))
    assert torch.equal(rotary_layout(rotary_layout(qkv, 64, flipped=True), 64, flipped=True), qkv)
    # Deliberately left behind, and reported: compatibility buffers and the (different) denoiser.
    assert sorted(imported.dropped_buffers) == sorted(
        ["var", "feat_rope.freqs_cos", "feat_rope.freqs_sin"] + [f"blocks.{i}.attn_mask" for i in range(4)])
    assert len(imported.denoiser_keys) == 2


def reference_rotation(self, first_slot, count, device, prefix=0):
    """``AffineBlock._build_rotation`` as the reference rotates: a head's first spatial pairs turn with the
    row and the next with the column, and slot s turns with the position of natural token s (in a flipped
    block, the mirror of the position of the token it holds)."""
    per_frame = self.spec.tokens_per_frame
    frames = 1 if self.spec.frame_local else -(-(first_slot + count) // per_frame)
    angles = rope_angles(self.spec.frame_size, frames, self.spec.head_dim, self.rope_theta)
    columns, rows, _ = rope_pair_split(self.spec.head_dim)
    angles = torch.cat([angles[:, columns:columns + rows], angles[:, :columns], angles[:, columns + rows:]], 1)
    slots = torch.arange(first_slot, first_slot + count)
    angles = torch.cat([angles.new_zeros(prefix, angles.shape[1]), angles[slots % per_frame if self.spec.frame_local
                                                                            else slots]])
    return angles.cos().to(device), angles.sin().to(device)


def test_imported_weights_compute_what_they_compute_under_the_references_rotary_layout(monkeypatch):
    """The reference's rotary layout, played by flowvid's blocks with their rotations replaced: the weights
    it trained, imported, give flowvid's flow the same z and log-determinants (video only: the reference
    rotates and reads text differently, which weights cannot make up for)."""
    torch.manual_seed(0)
    config = {**FLOW_CONFIG, "text_width": None}
    theirs = GlobalLocalFlow(**config)
    perturb_parameters(theirs, std=0.1)
    flipped = {f"shallow.{i}.": isinstance(block.permutation, Flip) for i, block in enumerate(theirs.shallow)}
    assert list(flipped.values()) == [True, False, True]  # the reference's order for three shallow blocks

    def imported(name: str, tensor: torch.Tensor) -> torch.Tensor:
        owner = name[:len("shallow.0.")]
        return rotary_layout(tensor, 64, flipped.get(owner, False)) if ".attn.qkv." in name else tensor

    ours = GlobalLocalFlow(**config)
    ours.load_state_dict({name: imported(name, tensor) for name, tensor in theirs.state_dict().items()})
    x = torch.randn(2, 3, 4, 4, CHANNELS)
    with torch.no_grad():
        expected = ours.encode(x)
        for block in theirs.blocks:
            monkeypatch.setattr(block, "_build_rotation", reference_rotation.__get__(block))
        actual = theirs.encode(x)
    assert (expected[0] - x).norm() > 0.5 * x.norm()  # the blocks are far from the identity
    torch.testing.assert_close(expected[0], actual[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected[1], actual[1], rtol=1e-5, atol=1e-5)


def test_a_head_size_whose_rotations_differ_from_the_references_is_refused():
    with pytest.raises(ValueError, match=r"head_dim 16: flowvid turns .* \(3, 3, 2\).*agree \(head_dim 64\)"):
        from_reference(reference_state_dict(), head_dim=16)


def test_the_flow_config_is_read_from_the_weights():
    flow_state = from_reference(reference_state_dict()).flow
    config = reference_flow_config(flow_state, frame_size=(4, 4), head_dim=64)
    assert config == {**FLOW_CONFIG, "frame_size": [4, 4]}


def test_reference_features_flowvid_lacks_are_errors_not_dropped():
    reference = reference_state_dict(prefix="")
    reference["blocks.0.pos_embed"] = torch.zeros(16, 64)  # learned positions instead of RoPE
    with pytest.raises(ValueError, match=r"no counterpart.*blocks\.0\.pos_embed"):
        from_reference(reference)


def test_an_odd_number_of_reference_blocks_is_refused():
    reference = {k: v for k, v in reference_state_dict(prefix="").items() if not k.startswith("blocks.3.")}
    with pytest.raises(ValueError, match="3 flow blocks.*natural order"):
        from_reference(reference)


def test_a_reference_file_imports_and_converts_through_the_command(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(reference_state_dict(), path)
    flow = import_reference_flow(path, frame_size=(4, 4))
    x = torch.randn(1, 2, 4, 4, CHANNELS)
    text = (torch.randn(1, 5, TEXT), torch.ones(1, 5, dtype=torch.bool))
    assert torch.isfinite(flow.nll(x, text)).all()

    out = tmp_path / "converted" / "flow.safetensors"
    args = ["--reference", str(path), "--frame-size", "4", "4", "--head-dim", "64", "--out", str(out)]
    assert main(args) == 0
    from safetensors.torch import load_file

    assert set(load_file(out)) == {f"flow.{k}" for k in flow.state_dict()}
    with pytest.raises(UserError, match="exists; pass --force"):
        main(args)
    # A folder, or a name the loaders would not take for an export, is refused before any work.
    for wrong, reason in ((out.parent, "is a folder"), (out.with_suffix(".pt"), "does not end in .safetensors")):
        with pytest.raises(UserError, match=reason):
            main([*args[:-1], str(wrong), "--force"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n" * 20, b"PK\x03\x04" + b"\x00" * 40])
def test_an_unreadable_reference_file_is_one_line_naming_it(tmp_path, content):
    # torch.load's KeyError, EOFError or RuntimeError ended the command in a traceback.
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    args = ["--reference", str(path), "--frame-size", "4", "4", "--out", str(tmp_path / "flow.safetensors")]
    with pytest.raises(UserError, match=re.escape(f"cannot read reference checkpoint {path}: truncated, or not a PyTorch file")):
        main(args)
    with pytest.raises(UserError, match=re.escape(f"reference checkpoint {tmp_path / 'nope.pth'} does not exist")):
        main([*args[:1], str(tmp_path / "nope.pth"), *args[2:]])
    assert not (tmp_path / "flow.safetensors").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update({"blocks.3.attn_blocks.1.mlp.main.0.weight": torch.randn(512, 64)}),
     "different shape: blocks.3.attn_blocks.1.mlp.main.0.weight (512, 64) (expected (512, 128))"),
    (lambda s: s.pop("blocks.1.proj_out.bias"), "missing: blocks.1.proj_out.bias"),
    (lambda s: s.pop("blocks.3.sos_embed"), "the reference checkpoint has no blocks.3.sos_embed"),
    (lambda s: s.pop("blocks.3.attn_blocks.0.mlp.main.0.weight"),
     "the reference checkpoint has no blocks.3.attn_blocks.0.mlp.main.0.weight"),
    (lambda s: s.update({"blocks.3.attn_blocks.0.attention.qkv.weight": torch.randn(100, 128)}),
     "reference tensor blocks.3.attn_blocks.0.attention.qkv.weight has shape (100, 128)"),
], ids=["other-shape", "missing", "no-sos", "no-mlp", "partial-heads"])
def test_a_reference_tensor_that_does_not_fit_is_one_line_naming_it(tmp_path, damage, message):
    # torch's size-mismatch RuntimeError, a KeyError or a reshape error ended the command in a traceback.
    reference = reference_state_dict(prefix="")
    damage(reference)
    path = tmp_path / "model.pth"
    torch.save(reference, path)
    out = tmp_path / "flow.safetensors"
    with pytest.raises(UserError, match=re.escape(message)) as error:
        main(["--reference", str(path), "--frame-size", "4", "4", "--out", str(out)])
    assert "\n" not in str(error.value) and not out.exists()


def test_the_converted_files_are_on_disk_before_their_rename_and_the_renames_after_them(tmp_path, monkeypatch):
    events = []
    replace, fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda *paths: (events.append(f"rename {paths[1].name}"), replace(*paths))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode)
                                                               else "file"), fsync(fd))[1])
    path = tmp_path / "model.pth"
    torch.save(reference_state_dict(), path)
    assert main(["--reference", str(path), "--frame-size", "4", "4", "--out", str(tmp_path / "flow.safetensors")]) == 0
    assert events == [event for name in ("flow.safetensors", "flow.yaml")
                      for event in ("file", f"rename {name}", "folder")]
