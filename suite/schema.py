"""The strict pydantic base every configuration model uses (run, sweep, and each method's own
section), and the "did you mean" hint of its error messages. Kept apart from suite/config.py so
that a method module can declare its section without importing the run configuration."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # inf / nan are refused in every float field: none of them means anything there (an inf LR
    # would only fail at the second step)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def did_you_mean(name: Any, options: Iterable[Any]) -> str:
    """' (did you mean X?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
