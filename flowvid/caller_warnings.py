"""Warnings that name the line which called into flowvid.

A warning raised deep inside flowvid (reading a file for ``VideoPipeline.score``, a text encoder meeting
unknown words) names, with a fixed ``stacklevel``, one of flowvid's own lines, and the depth differs from
one way in to the next. ``warn_caller`` walks past every flowvid frame instead, so the warning names the
user's ``pipe(...)`` line, at which ``warnings.filterwarnings(module=...)`` can be aimed.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings

import torch

#: Where flowvid's code lies (with the plugins that ship with it), and the decorators around its methods
#: (contextlib's, torch's ``no_grad``, ``nn.Module.__call__``): the frames a warning passes over to name the
#: caller's line.
FLOWVID_FOLDERS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), package) + os.sep
                        for package in ("flowvid", "flowvid_plugins"))
PASSED_OVER_FILES = frozenset(inspect.getfile(code) for code in (contextlib.ContextDecorator.__call__,
                                                                 torch.no_grad.__call__, torch.nn.Module.__call__))


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn at the first line outside flowvid (and the decorators around its methods); at the outermost
    frame if every one is inside, as under ``flowvid`` commands, which print warnings without a line."""
    frame, level = sys._getframe(1), 2  # the frame that called warn_caller is warnings.warn's stacklevel 2
    while frame.f_back is not None and _passed_over(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _passed_over(filename: str) -> bool:
    return filename.startswith(FLOWVID_FOLDERS) or filename in PASSED_OVER_FILES
