"""The I3D network on random weights: loading the converted state-dict layout, shapes, clear errors."""

import hashlib

import numpy as np
import pytest
import torch

from flowvid.metrics import FrechetVideoDistance, I3DExtractor, InceptionI3D, ReferenceStats
from flowvid.metrics.i3d import WEIGHTS_URL, same_padding


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Random weights saved like the converted TF-Hub file: no batch-norm step counters."""
    torch.manual_seed(0)
    state = {k: v for k, v in InceptionI3D().state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(state, path)
    return path


def test_parameter_names_follow_the_converted_weights():
    names = InceptionI3D().state_dict().keys()
    assert {"Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_var", "Mixed_4b.b1b.bn.bias",
            "Mixed_5c.b3b.conv3d.weight", "logits.conv3d.weight", "logits.conv3d.bias"} <= set(names)
    assert not any(".b3a." in name for name in names)  # the pooling branch has no parameters


def test_same_padding_follows_tensorflow():
    # (T, H, W) = (16, 224, 224), kernel 7, stride 2: 5 rows of padding, the extra one at the end.
    assert same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert same_padding((5, 7, 7), (3, 3, 3), (1, 1, 1)) == [1, 1, 1, 1, 1, 1]
    assert same_padding((3, 7, 7), (1, 3, 3), (1, 2, 2)) == [1, 1, 1, 1, 0, 0]


def test_standard_input_reaches_the_original_2x7x7_head():
    # Shapes only, on the meta device: 16 frames of 224x224 end in a (2, 7, 7) map of 1024 channels.
    network = InceptionI3D().to("meta")
    seen = {}
    network.logits.register_forward_hook(lambda module, inputs, output: seen.update(head=inputs[0].shape, out=output.shape))
    network(torch.empty(1, 3, 16, 224, 224, device="meta"))
    assert tuple(seen["head"]) == (1, 1024, 2, 7, 7)
    assert tuple(seen["out"]) == (1, 400)


def test_features_on_random_weights_at_a_tiny_size(weights_file):
    extractor = I3DExtractor(weights=weights_file, resolution=16)
    videos = torch.randint(0, 256, (2, 4, 20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features = extractor.features(videos)
    assert features.shape == (2, 400) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    torch.testing.assert_close(extractor.features(videos[:1]), features[:1], rtol=1e-4, atol=1e-4)
    assert extractor.weights_hash == hashlib.sha256(weights_file.read_bytes()).hexdigest()

    metric = FrechetVideoDistance(extractor)
    metric.update(videos, real=True)
    metric.update(videos.flip(0), real=False)
    assert float(metric.compute()) < 1e-6
    assert metric.protocol_name == "fvd/i3d-resolution16_f4_r20x24_n2"  # not the standard 224


def test_built_by_name_from_config_arguments(weights_file):
    metric = FrechetVideoDistance("i3d", extractor_args={"weights": str(weights_file), "resolution": 16})
    assert isinstance(metric.extractor, I3DExtractor) and metric.extractor.resolution == 16


def test_training_mode_never_updates_batch_statistics(weights_file):
    extractor = I3DExtractor(weights=weights_file, resolution=16).train()
    before = extractor.network.Conv3d_1a_7x7.bn.running_mean.clone()
    extractor.features(torch.zeros(1, 4, 32, 32, 3, dtype=torch.uint8))
    assert not extractor.network.training
    torch.testing.assert_close(extractor.network.Conv3d_1a_7x7.bn.running_mean, before)


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        I3DExtractor(weights=tmp_path / "nowhere" / "i3d_pretrained_400.pt")
    message = str(error.value)
    assert "i3d_pretrained_400.pt" in message and WEIGHTS_URL in message and "inception-proxy" in message


def test_another_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"not the Kinetics-400 I3D .*missing \['Conv3d_1a_7x7"):
        I3DExtractor(weights=path)


def test_weights_holding_nan_are_refused_naming_the_tensor(weights_file, tmp_path):
    state = torch.load(weights_file)
    state["Mixed_5c.b3b.conv3d.weight"][0] = float("inf")
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"{path} is damaged: Mixed_5c.b3b.conv3d.weight holds NaN or infinite"):
        I3DExtractor(weights=path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short"], ids=["empty", "truncated"])
def test_a_damaged_weights_file_is_named_with_where_to_get_it_again(tmp_path, content):
    path = tmp_path / "i3d_pretrained_400.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read I3D weights {path}: truncated, or not a PyTorch file .*{WEIGHTS_URL}"):
        I3DExtractor(weights=path)


def test_a_torchscript_i3d_is_refused_as_a_program_naming_the_file_to_get_instead(tmp_path):
    """Other FVD code bases ship I3D as TorchScript (i3d_torchscript.pt); torch would call it damaged and advise
    loading it with weights_only=False, which runs the code inside."""
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(ValueError) as error:
        I3DExtractor(weights=path)
    message = str(error.value)
    assert f"cannot read I3D weights {path}: it is a TorchScript program, not a file of tensors" in message
    assert "i3d_pretrained_400.pt" in message and WEIGHTS_URL in message and "weights_only" not in message


def test_the_resolution_is_part_of_the_reference_key_and_of_a_non_standard_protocol_name(weights_file, tmp_path):
    at_16, at_32 = (I3DExtractor(weights=weights_file, resolution=side) for side in (16, 32))
    assert at_32.protocol_label == "i3d-resolution32"
    assert I3DExtractor(weights=weights_file).protocol_label == "i3d"  # the standard protocol keeps its name
    stats = ReferenceStats(mu=np.zeros(400), sigma=np.eye(400), frames=4, height=16, width=16, num_samples=8,
                           **at_16.identity())
    path = stats.save(tmp_path / stats.file_name())
    assert path.name.startswith("i3d-resolution16_") and ReferenceStats.load(path).key() == stats.key()
    FrechetVideoDistance(at_16).set_reference(path)
    with pytest.raises(ValueError, match=r"has extractor_settings \{'resolution': 16\}, this metric's extractor has "
                                         r"\{'resolution': 32\}; recompute it"):
        FrechetVideoDistance(at_32).set_reference(path)

    # A file written before the settings were recorded cannot say its resolution: refused, to be recomputed.
    old = tmp_path / "old.npz"
    np.savez(old, mu=stats.mu, sigma=stats.sigma, extractor="i3d", weights_hash=stats.weights_hash, frames=4,
             height=16, width=16, num_samples=8)
    with pytest.raises(ValueError, match=r"has extractor_settings \{\}, .* \{'resolution': 16\}; recompute it"):
        FrechetVideoDistance(at_16).set_reference(old)


def test_a_module_holding_the_metric_saves_no_extractor_weights_and_loads_none(weights_file):
    """The weights come from their file, named by hash in every reference: a checkpoint neither carries
    them nor, written when it did, replaces them."""
    holder = torch.nn.Module()
    holder.fvd = FrechetVideoDistance("i3d", extractor_args={"weights": str(weights_file), "resolution": 16})
    holder.head = torch.nn.Linear(2, 2)
    assert set(holder.state_dict()) == {"head.weight", "head.bias"}
    from_file = {name: tensor.clone() for name, tensor in holder.fvd.extractor.state_dict().items()}
    older = {**holder.state_dict(), **{f"fvd.extractor.{name}": torch.zeros_like(tensor)
                                       for name, tensor in from_file.items()}}
    holder.load_state_dict(holder.state_dict())  # strict: nothing missing
    holder.load_state_dict(older)
    for name, tensor in holder.fvd.extractor.state_dict().items():
        assert torch.equal(tensor, from_file[name]), name


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def tf32_allowed():
    """TF32 on for convolutions and matmuls, as a user training on an Ampere GPU may set it."""
    convolutions, precision = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = convolutions
    torch.set_float32_matmul_precision(precision)


def test_i3d_runs_without_tf32_and_gives_the_callers_settings_back(weights_file, tf32_allowed):
    extractor = I3DExtractor(weights=weights_file, resolution=16)
    seen = []
    extractor.network.register_forward_pre_hook(lambda module, inputs: seen.append(tf32_flags()))
    extractor.features(torch.zeros(1, 4, 16, 16, 3, dtype=torch.uint8))
    assert seen == [(False, False)]
    assert tf32_flags() == (True, True)


@pytest.mark.skipif(not hasattr(torch.backends.cudnn.conv, "fp32_precision"), reason="torch before 2.9")
def test_tf32_set_per_backend_is_turned_off_and_given_back_too(weights_file):
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "tf32"
    try:
        check_per_backend_tf32_is_off_inside_and_given_back(weights_file, backends)
    finally:
        for backend, precision in zip(backends, before):
            backend.fp32_precision = precision


def check_per_backend_tf32_is_off_inside_and_given_back(weights_file, backends):
    extractor = I3DExtractor(weights=weights_file, resolution=16)
    seen = []
    extractor.network.register_forward_pre_hook(
        lambda module, inputs: seen.append([backend.fp32_precision for backend in backends]))
    extractor.features(torch.zeros(1, 4, 16, 16, 3, dtype=torch.uint8))
    assert seen == [["ieee", "ieee"]]
    assert [backend.fp32_precision for backend in backends] == ["tf32", "tf32"]
