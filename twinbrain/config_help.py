"""``--help`` text for every config field, generated from the dataclasses in :mod:`twinbrain.config`.

The meaning of a field is its trailing comment in ``config.py`` (one source: the line that defines the
default); the type comes from the annotation, the default from the dataclass, allowed values from
``CHOICES``. A field without a comment is listed with its type and default only.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing

from twinbrain.config import CHOICES, Config


@functools.cache
def _source(cls: type) -> str:
    # inspect.getsource parses the whole module each call: once per class, not once per field
    # (every CLI start builds every verb's help).
    return inspect.getsource(cls)


def _comment(cls: type, name: str) -> str:
    m = re.search(rf"^\s+{re.escape(name)}\s*:[^\n#]*(?:\([^\n]*\))?[^\n#]*#\s*(.+?)\s*$",
                  _source(cls), re.M)
    return m.group(1) if m else ""


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"list[{typing.get_args(hint)[0].__name__}]"
    return getattr(hint, "__name__", str(hint))


def config_fields(sections: tuple[str, ...] | None = None) -> list[tuple[str, str, object, str]]:
    """``[(key, type, default, meaning)]`` for every field of ``Config`` (or of ``sections``)."""
    cfg = Config()
    out = []
    for sec in dataclasses.fields(cfg):
        if sections and sec.name not in sections:
            continue
        obj = getattr(cfg, sec.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            key = f"{sec.name}.{f.name}"
            meaning = _comment(type(obj), f.name)
            if key in CHOICES and "|" not in meaning:
                meaning = (meaning + "; " if meaning else "") + "one of " + " | ".join(CHOICES[key])
            out.append((key, _type_name(hints[f.name]), getattr(obj, f.name), meaning))
    return out


def config_help(sections: tuple[str, ...] | None = None, keys: tuple[str, ...] = (),
                title: str = "config fields (override any with --section.key VALUE)") -> str:
    """Help text: one line per field, ``  key  type = default  meaning``, grouped by section.
    ``keys``: extra single fields outside ``sections`` (e.g. ``data.num_workers``)."""
    rows = [r for r in config_fields() if (sections is None or r[0].split(".")[0] in sections) or r[0] in keys]
    width = min(max(len(f"{k}  {t} = {d!r}") for k, t, d, _ in rows), 44) + 2
    lines, last = [title + ":"], None
    for key, tname, default, meaning in rows:
        sec = key.split(".")[0]
        if sec != last:
            lines.append(f"\n {sec}:")
            last = sec
        head = f"{key}  {tname} = {default!r}"
        if len(head) > width - 2 and meaning:        # long default: meaning on its own line
            lines += [f"  {head}", f"  {'':<{width}}{meaning}"]
        else:
            lines.append(f"  {head:<{width}}{meaning}".rstrip())
    return "\n".join(lines)
