"""The one wording of what differs between a recorded setting ("there") and the current one ("here")."""

from flowvid.checks import differences


def test_strings_are_quoted_other_values_shown_plainly_and_a_missing_key_as_absent():
    there = {"width": "8", "patch_size": 1, "tiled": True, "scale": None, "name": "a", "same": 3}
    here = {"width": 8, "patch_size": 2, "tiled": False, "scale": 0.5, "name": "a", "same": 3, "extra": "x"}
    assert differences(there, here) == (
        "extra (absent there, 'x' here), patch_size (1 there, 2 here), scale (None there, 0.5 here), "
        "tiled (True there, False here), width ('8' there, 8 here)")
    assert differences({"scale": None}, {}) == "scale (None there, absent here)"


def test_given_keys_are_looked_at_in_their_order_and_only_differing_ones_are_shown():
    there, here = {"name": "a", "width": 8, "depth": 2}, {"name": "b", "width": 16, "depth": 2}
    shown = differences(there, here, ["width", "depth", "name"])
    assert shown == "width (8 there, 16 here), name ('a' there, 'b' here)"
    assert differences(there, here, ["depth", "missing"]) == ""
    assert differences(there, dict(there)) == ""
