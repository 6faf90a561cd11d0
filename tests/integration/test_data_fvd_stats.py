"""``flowvid data fvd-stats`` refuses extractor arguments it cannot use in one line, before computing anything."""

import numpy as np
import pytest

from data_tools.cli import main as data_main
from data_tools.report import console
from flowvid.data import write_synthetic_dataset
from flowvid.metrics.i3d import WEIGHTS_FILE, WEIGHTS_URL


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=8, frames=4, size=16, val_videos=2)
    return root / "train"


@pytest.fixture
def wide_console(monkeypatch):
    monkeypatch.setattr(console, "width", 1000)  # each message on one line, addresses unbroken


def test_i3d_without_weights_says_which_file_which_option_and_where_to_get_it(raw_folder, capsys, wide_console):
    code = data_main(["fvd-stats", str(raw_folder), "--extractor", "i3d", "--frames", "4", "--max-samples", "8"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("flowvid data fvd-stats: error:") and error.count("\n") == 1
    assert "Traceback" not in error
    assert "i3d extractor needs its weights file" in error and "--extractor-args" in error
    assert WEIGHTS_FILE in error and WEIGHTS_URL in error
    assert not (raw_folder / "fvd_stats").exists()


def test_a_misspelt_extractor_argument_names_the_accepted_ones(raw_folder, capsys, wide_console):
    code = data_main(["fvd-stats", str(raw_folder), "--extractor", "i3d", "--extractor-args", '{"weight": "i3d.pt"}'])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("flowvid data fvd-stats: error:") and error.count("\n") == 1
    assert "FVD extractor 'i3d' takes no argument 'weight'" in error and "weights, resolution" in error
    with pytest.raises(SystemExit) as refused:  # argparse: not a JSON object
        data_main(["fvd-stats", str(raw_folder), "--extractor-args", '["weights"]'])
    assert refused.value.code == 2
    assert not (raw_folder / "fvd_stats").exists()


def test_an_output_that_cannot_hold_the_statistics_is_one_line_before_computing(raw_folder, tmp_path, capsys,
                                                                                 wide_console):
    notes = tmp_path / "notes.npz"  # the user's text under an .npz name
    notes.write_text("keep me")
    cut = tmp_path / "cut.npz"  # statistics cut short (a zip without its directory): BadZipFile was a traceback
    np.savez(cut, mu=np.zeros(64))
    cut.write_bytes(cut.read_bytes()[:200])
    refusals = {
        str(cut): f"{cut} is not an FVD reference file (an .npz written by `flowvid data fvd-stats`); "
                  "give another --out, or --force to replace it",
        # numpy's "contains pickled (object) data" named neither the file nor what to do
        str(notes): f"{notes} is not an FVD reference file (an .npz written by `flowvid data fvd-stats`); "
                    "give another --out, or --force to replace it",
        # a traceback (FileExistsError) once every clip had been read
        str(notes / "stats.npz"): f"--out {notes / 'stats.npz'} is inside the file {notes}",
        str(tmp_path): f"--out {tmp_path} is a folder",
    }
    for out, message in refusals.items():
        assert data_main(["fvd-stats", str(raw_folder), "--out", out]) == 2
        error = capsys.readouterr().err
        assert error.startswith("flowvid data fvd-stats: error:") and error.count("\n") == 1 and message in error
    assert notes.read_text() == "keep me"


def test_an_output_over_the_folders_own_files_is_refused_even_with_force(raw_folder, capsys, wide_console):
    for own in (raw_folder / "manifest.json", sorted(raw_folder.glob("shard-*.tar"))[0]):
        before = own.read_bytes()
        for force in ([], ["--force"]):  # --force was offered to replace it, and replaced it
            code = data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out", str(own), *force])
            error = capsys.readouterr().err
            assert code == 2 and error.startswith("flowvid data fvd-stats: error:") and error.count("\n") == 1
            assert f"--out {own} is one of the inputs" in error and "--force" not in error
        assert own.read_bytes() == before


@pytest.fixture
def extractor_builds(monkeypatch):
    """The extractors fvd-stats builds, recorded: none is built for a request refused before any work."""
    from data_tools import fvd_stats

    built = []
    monkeypatch.setattr(fvd_stats, "build_extractor", lambda *args, **kwargs: built.append(args))
    return built


@pytest.mark.parametrize("option, value, message", [
    ("--max-samples", "1", "--max-samples must be >= 2 (a covariance needs 2 clips), got 1"),  # read every clip first
    ("--max-samples", "0", "--max-samples must be >= 2 (a covariance needs 2 clips), got 0"),
    ("--max-samples", "-3", "--max-samples must be >= 2 (a covariance needs 2 clips), got -3"),
    ("--frames", "5", "--frames must be between 1 and the clips' 4 frames, got 5"),  # refused after the progress bar
])
def test_a_request_that_cannot_give_statistics_is_refused_before_any_work(raw_folder, capsys, wide_console,
                                                                           extractor_builds, option, value, message):
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", option, value]) == 2
    error = capsys.readouterr().err
    assert error.startswith("flowvid data fvd-stats: error:") and error.count("\n") == 1 and message in error
    assert extractor_builds == [] and not (raw_folder / "fvd_stats").exists()


def test_an_output_without_the_npz_suffix_is_refused_in_one_line(raw_folder, tmp_path, capsys, wide_console,
                                                                 extractor_builds):
    # The file was written as given, while `--reference stats.npz` (numpy's own naming) was not found.
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out", str(tmp_path / "stats")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("flowvid data fvd-stats: error:") and error.count("\n") == 1
    assert f"--out {tmp_path / 'stats'} does not end in .npz; give the .npz file to write, e.g. " \
           f"{tmp_path / 'stats'}.npz" in error
    assert extractor_builds == [] and list(tmp_path.iterdir()) == []


def test_an_extractor_that_gives_nan_features_is_named_and_no_statistics_are_written(raw_folder, tmp_path, capsys,
                                                                                      wide_console, monkeypatch):
    from flowvid.metrics import PixelStatsExtractor
    from flowvid.registry import FVD_EXTRACTORS

    class NaNFeatures(PixelStatsExtractor):
        def features(self, video):
            return super().features(video) * float("nan")

    monkeypatch.setattr(FVD_EXTRACTORS, "_entries", dict(FVD_EXTRACTORS._entries))  # restored after the test
    FVD_EXTRACTORS.add("nan-features", NaNFeatures)
    out = tmp_path / "stats.npz"
    assert data_main(["fvd-stats", str(raw_folder), "--extractor", "nan-features", "--batch-size", "4",
                      "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "FVD extractor 'nan-features' gave NaN or inf features for 4 of the 4 videos of this batch" in error
    assert not out.exists()
