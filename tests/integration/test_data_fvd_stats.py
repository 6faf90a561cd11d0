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
    assert code == 2 and error.startswith("error:") and error.count("\n") == 1 and "Traceback" not in error
    assert "i3d extractor needs its weights file" in error and "--extractor-args" in error
    assert WEIGHTS_FILE in error and WEIGHTS_URL in error
    assert not (raw_folder / "fvd_stats").exists()


def test_a_misspelt_extractor_argument_names_the_accepted_ones(raw_folder, capsys, wide_console):
    code = data_main(["fvd-stats", str(raw_folder), "--extractor", "i3d", "--extractor-args", '{"weight": "i3d.pt"}'])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error:") and error.count("\n") == 1
    assert "FVD extractor 'i3d' takes no argument 'weight'" in error and "weights, resolution" in error
    with pytest.raises(SystemExit) as refused:  # argparse: not a JSON object
        data_main(["fvd-stats", str(raw_folder), "--extractor-args", '["weights"]'])
    assert refused.value.code == 2
    assert not (raw_folder / "fvd_stats").exists()


def test_an_output_that_cannot_hold_the_statistics_is_one_line_before_computing(raw_folder, tmp_path, capsys,
                                                                                 wide_console):
    notes = tmp_path / "notes.txt"
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
        assert error.startswith("error:") and error.count("\n") == 1 and message in error
    assert notes.read_text() == "keep me"


def test_an_output_over_the_folders_own_files_is_refused_even_with_force(raw_folder, capsys, wide_console):
    for own in (raw_folder / "manifest.json", sorted(raw_folder.glob("shard-*.tar"))[0]):
        before = own.read_bytes()
        for force in ([], ["--force"]):  # --force was offered to replace it, and replaced it
            code = data_main(["fvd-stats", str(raw_folder), "--extractor", "pixel-stats", "--out", str(own), *force])
            error = capsys.readouterr().err
            assert code == 2 and error.startswith("error:") and error.count("\n") == 1
            assert f"--out {own} is one of the inputs" in error and "--force" not in error
        assert own.read_bytes() == before
