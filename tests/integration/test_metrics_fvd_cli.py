"""``flowvid data fvd``: the FVD of a folder of generated videos against a real set."""

import json

import numpy as np
import pytest

from data_tools.cli import main as data_main
from flowvid.data import write_synthetic_dataset
from flowvid.data.manifest import load_manifest
from flowvid.data.shards import SampleSpec, decode_sample, iter_tar, shard_paths


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=12, frames=4, size=16, val_videos=4, shard_samples=5)
    return root / "train"


@pytest.fixture(scope="module")
def real_clips(raw_folder) -> np.ndarray:
    manifest = load_manifest(raw_folder)
    spec = SampleSpec.from_manifest(manifest)
    return np.stack([decode_sample(raw, spec)["video"] for shard in shard_paths(raw_folder, manifest)
                     for raw in iter_tar(shard)])


def write_videos(folder, videos) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, video in enumerate(videos):
        np.save(folder / f"video_{index:02d}.npy", video)


def fvd(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert data_main(["fvd", *args, "--extractor", "pixel-stats"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_real_set_against_itself_is_zero_and_noise_is_far(raw_folder, real_clips, tmp_path, capsys):
    write_videos(tmp_path / "same", real_clips)
    same = fvd(capsys, str(tmp_path / "same"), "--reference", str(raw_folder))
    assert same["fvd"] < 1e-6 and same["generated"] == len(real_clips) and same["skipped"] == 0
    assert same["protocol"].endswith(f"pixel-stats_f4_r16_n{len(real_clips)}")

    noise = np.random.default_rng(0).integers(0, 256, real_clips.shape, dtype=np.uint8)
    write_videos(tmp_path / "noise", noise)
    assert fvd(capsys, str(tmp_path / "noise"), "--reference", str(raw_folder))["fvd"] > 100 * same["fvd"] + 1


def test_a_cached_reference_file_gives_the_number_of_its_folder(raw_folder, real_clips, tmp_path, capsys):
    write_videos(tmp_path / "generated", real_clips[::-1][:7])
    stats = tmp_path / "reference.npz"
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out", str(stats)]) == 0
    from_file = fvd(capsys, str(tmp_path / "generated"), "--reference", str(stats), "--out", str(tmp_path / "r.json"))
    from_folder = fvd(capsys, str(tmp_path / "generated"), "--reference", str(raw_folder))
    assert from_file["fvd"] == pytest.approx(from_folder["fvd"], rel=1e-9) and from_file["fvd"] > 0
    assert json.loads((tmp_path / "r.json").read_text()) == from_file


def test_a_shard_folder_reference_is_computed_once_and_kept_beside_its_shards(raw_folder, real_clips, tmp_path,
                                                                              capsys):
    import shutil

    folder = tmp_path / "real"
    shutil.copytree(raw_folder, folder, ignore=shutil.ignore_patterns("fvd_stats"))
    write_videos(tmp_path / "generated", real_clips[:6])
    first = fvd(capsys, str(tmp_path / "generated"), "--reference", str(folder))
    [kept] = (folder / "fvd_stats").iterdir()
    assert kept.name.startswith("pixel-stats") and kept.name.endswith(f"_n{len(real_clips)}.npz")
    again = fvd(capsys, str(tmp_path / "generated"), "--reference", str(folder))
    assert again == first
    capsys.readouterr()
    assert data_main(["fvd", str(tmp_path / "generated"), "--reference", str(folder), "--extractor", "pixel-stats"]) == 0
    printed = " ".join(capsys.readouterr().err.split())
    assert f"read from {kept}" in printed
    assert "6 generated videos for 96 features: the covariance is singular" in printed
    assert data_main(["fvd-stats", str(folder), "--extractor", "pixel-stats"]) == 0  # the same file, for both tools
    assert "already holds these statistics" in " ".join(capsys.readouterr().err.split())


def test_a_reference_file_fixes_the_extractor_and_a_mismatch_names_the_file(raw_folder, real_clips, tmp_path, capsys):
    write_videos(tmp_path / "generated", real_clips[:3])
    stats = tmp_path / "reference.npz"
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out", str(stats)]) == 0
    capsys.readouterr()
    assert data_main(["fvd", str(tmp_path / "generated"), "--reference", str(stats)]) == 0  # no --extractor
    assert "/pixel-stats_f4_r16_n3" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol"]

    assert data_main(["fvd", str(tmp_path / "generated"), "--reference", str(stats),
                      "--extractor", "inception-proxy"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert f"error: --reference {stats} (computed from {raw_folder}) has extractor 'pixel-stats'" in err


def test_unreadable_and_short_videos_are_skipped_and_counted(raw_folder, real_clips, tmp_path, capsys):
    folder = tmp_path / "generated"
    write_videos(folder, real_clips[:5])
    (folder / "damaged.npy").write_bytes(b"not an array")
    np.save(folder / "short.npy", real_clips[0][:2])
    np.save(folder / "video_00.latent.npy", np.zeros((4, 8, 8, 12), np.float32))  # generate's latents: no video
    result = fvd(capsys, str(folder), "--reference", str(raw_folder))
    assert result["generated"] == 5 and result["skipped"] == 2


@pytest.mark.parametrize("case, message", [
    ("missing reference", "does not exist"),
    ("no videos", "no videos found"),
    ("one video", "1 usable generated video (0 skipped)"),
])
def test_inputs_that_cannot_give_an_fvd_are_one_line_errors(raw_folder, real_clips, tmp_path, capsys, case, message):
    write_videos(tmp_path / "generated", real_clips[:1] if case == "one video" else real_clips[:3])
    (tmp_path / "empty").mkdir()
    generated = tmp_path / ("empty" if case == "no videos" else "generated")
    reference = tmp_path / "nope.npz" if case == "missing reference" else raw_folder
    capsys.readouterr()
    assert data_main(["fvd", str(generated), "--reference", str(reference), "--extractor", "pixel-stats"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert message in err and "Traceback" not in err


def test_too_few_usable_videos_print_why_they_were_skipped_before_the_error(raw_folder, real_clips, tmp_path, capsys):
    write_videos(tmp_path / "generated", real_clips[:3, :2])  # 2 frames each, the reference has 4
    capsys.readouterr()
    assert data_main(["fvd", str(tmp_path / "generated"), "--reference", str(raw_folder),
                      "--extractor", "pixel-stats"]) == 1  # videos were given, and failed
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped: too_short │ 3" in err and "too_short: 2 frames, the reference has 4" in err
    assert "error: 0 usable generated videos (3 skipped); FVD needs at least 2" in err


def test_videos_found_but_unreadable_exit_1_and_none_found_exit_2(raw_folder, real_clips, tmp_path, capsys):
    folder = tmp_path / "generated"
    write_videos(folder, real_clips[:1])
    (folder / "damaged.npy").write_bytes(b"not an array")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert data_main(["fvd", str(folder), "--reference", str(raw_folder), "--extractor", "pixel-stats"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "unreadable" in err and "error: 1 usable generated video (1 skipped); FVD needs at least 2" in err
    assert data_main(["fvd", str(tmp_path / "empty"), "--reference", str(raw_folder),
                      "--extractor", "pixel-stats"]) == 2
    assert "error: no videos found" in " ".join(capsys.readouterr().err.split())


def test_videos_longer_or_of_another_size_are_cut_and_fitted_and_counted(raw_folder, real_clips, tmp_path, capsys):
    from flowvid.media import fit_frames

    longer = np.concatenate([real_clips[:4], real_clips[4:8]], axis=1)  # 8 frames, the reference has 4
    portrait = np.random.default_rng(1).integers(0, 256, (3, 4, 32, 24, 3), dtype=np.uint8)
    write_videos(tmp_path / "long", longer)
    write_videos(tmp_path / "portrait", portrait)
    result = fvd(capsys, str(tmp_path / "long"), str(tmp_path / "portrait"), "--reference", str(raw_folder))
    assert (result["generated"], result["cut"], result["resized"], result["skipped"]) == (7, 4, 3, 0)

    # The same number as for videos fitted beforehand: centre-cropped to 24x24, then resized to 16x16.
    write_videos(tmp_path / "fitted", [*longer[:, :4], *(fit_frames(list(video), 16, 16) for video in portrait)])
    fitted = fvd(capsys, str(tmp_path / "fitted"), "--reference", str(raw_folder))
    assert (fitted["cut"], fitted["resized"]) == (0, 0)
    assert fitted["fvd"] == pytest.approx(result["fvd"], rel=1e-12)


def test_an_output_over_an_input_is_refused_before_any_work(raw_folder, real_clips, tmp_path, capsys):
    write_videos(tmp_path / "generated", real_clips[:3])
    stats = tmp_path / "reference.npz"
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out", str(stats)]) == 0
    video = tmp_path / "generated" / "video_00.npy"
    for reference, out in ((stats, stats), (stats, video), (raw_folder, raw_folder / "manifest.json")):
        before = out.read_bytes()
        capsys.readouterr()
        assert data_main(["fvd", str(tmp_path / "generated"), "--reference", str(reference), "--out", str(out),
                          "--extractor", "pixel-stats"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: --out {out} is one of the inputs" in err and out.read_bytes() == before


def test_a_distance_of_many_features_is_announced_before_it_is_computed(raw_folder, real_clips, tmp_path, capsys,
                                                                        monkeypatch):
    from data_tools import fvd as fvd_command

    write_videos(tmp_path / "generated", real_clips[:4])
    args = ["fvd", str(tmp_path / "generated"), "--reference", str(raw_folder), "--extractor", "pixel-stats"]
    capsys.readouterr()
    assert data_main(args) == 0
    assert "Fréchet distance" not in capsys.readouterr().err  # 96 features: a moment
    monkeypatch.setattr(fvd_command, "LONG_DISTANCE_FEATURES", 96)  # as inception-proxy's 4096 are
    assert data_main(args) == 0
    error = " ".join(capsys.readouterr().err.split())
    assert "note computing the Fréchet distance of 96 features; on a CPU of few cores this takes a minute or more" \
           in error
