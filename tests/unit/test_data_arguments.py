"""JSON constructor arguments (``--codec-args`` ...) checked against the constructor's annotations."""

from typing import Literal, Optional, Sequence

import pytest

from data_tools.arguments import check_argument_types, fits


class Codec:
    def __init__(self, path: str, scale: float = 0.6, depth: int = 2, posterior: bool = False,
                 checkpoint: str | None = None, sizes: tuple[int, int] = (1, 2), names: Sequence[str] = (),
                 mode: Literal["mean", "sample"] = "mean", anything=None, table: dict[str, float] | None = None):
        pass


@pytest.mark.parametrize("arguments", [
    {"path": "vae", "scale": 1, "depth": 3, "posterior": True, "checkpoint": None},
    {"path": "vae", "checkpoint": "a.pt", "sizes": [3, 4], "names": ["a", "b"], "mode": "sample"},
    {"path": "vae", "anything": {"x": [1]}, "table": {"a": 1, "b": 0.5}},
])
def test_json_values_of_the_annotated_types_pass(arguments):
    check_argument_types("codec 'c'", Codec, arguments, "--codec-args")


@pytest.mark.parametrize("key,value,expected", [
    ("scale", "0.6", "float"),
    ("path", 5, "str"),
    ("depth", "2", "int"),
    ("depth", 2.5, "int"),
    ("depth", True, "int"),  # JSON true is no count
    ("posterior", 1, "bool"),
    ("checkpoint", 3, "str | None"),
    ("sizes", [1, 2, 3], "tuple[int, int]"),
    ("names", [1], "Sequence[str]"),
    ("mode", "median", "Literal['mean', 'sample']"),
    ("table", {"a": "1"}, "dict[str, float] | None"),
])
def test_a_value_of_another_type_is_one_value_error_naming_option_key_and_both_types(key, value, expected):
    with pytest.raises(ValueError) as caught:
        check_argument_types("codec 'c'", Codec, {"path": "vae", key: value}, "--codec-args")
    message = str(caught.value)
    assert message == (f"codec 'c' takes {key!r} as {expected}, got {type(value).__name__} {value!r} "
                       "(in --codec-args)")


def test_annotations_it_cannot_judge_let_the_value_through():
    class Unresolved:
        def __init__(self, dtype: "torch.dtype" = None):  # noqa: F821 - a name its module lacks
            pass

    check_argument_types("codec 'u'", Unresolved, {"dtype": 5}, "--codec-args")
    assert fits("x", Optional["NoSuchName"])
