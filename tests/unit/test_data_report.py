"""The summary tables of the data tools."""

import io

from rich.console import Console

from data_tools.report import print_summary


def test_a_long_path_is_folded_over_lines_not_cut_short():
    path = "data/split/val/fvd_stats/pixel-stats_noweights_f8_r32x32_n20_0123456789abcdef.npz"
    shown = io.StringIO()
    print_summary("fvd-stats", {"file": path, "clips": 20}, to=Console(file=shown, width=60))
    table = "".join(character for character in shown.getvalue() if character not in " │┃┏┓┗┛━┡┩┃\n─┌┐└┘├┤┬┴┼")
    assert path.replace(" ", "") in table
