"""The parameters a shortcut job records in its JSON output."""

from __future__ import annotations

import copy
import dataclasses

from ..options import is_group


def config_record(config) -> dict:
    """A config's values by field name, its groups flattened (``{"vocab_size": 256, "batch_size": 64, ...}``): the
    ``config`` that discovery.json, prompting.json and repair.json record, as they did before the groups."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if is_group(f):
            out.update(config_record(value))
        else:
            out[f.name] = copy.deepcopy(value)
    return out
