"""The data tools print their results on stdout, so that they can be piped; progress stays on stderr."""

from __future__ import annotations

import numpy as np

from data_tools.cli import main as data_main
from flowvid.data.manifest import new_manifest, write_manifest
from flowvid.data.shards import ShardFolderWriter, encode_sample


def shard_folder(folder, captions=("a red circle", "a blue square")):
    with ShardFolderWriter(folder) as writer:
        for index, caption in enumerate(captions):
            writer.write(encode_sample(f"clip{index}", caption, {}, frames=np.zeros((2, 4, 4, 3), np.uint8)))
    video = {"frames": 2, "height": 4, "width": 4, "fps": 8.0}
    write_manifest(folder, new_manifest("raw", video, samples=writer.samples, num_shards=len(writer.shards),
                                        shards=writer.shards))


def test_describe_and_verify_print_their_tables_on_stdout_for_a_pipe(tmp_path, capsys):
    shard_folder(tmp_path)
    assert data_main(["describe", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert "a blue square" in printed.out and "raw" in printed.out and printed.err == ""

    assert data_main(["verify", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert "shard-000000.tar" in printed.out and "OK" in printed.out and "2 samples" in printed.out
    (tmp_path / "shard-000000.tar").write_bytes(b"damaged")
    assert data_main(["verify", str(tmp_path)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
