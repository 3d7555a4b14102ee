"""What every config dataclass shares (bottom layer: imports nothing of hf_compress)."""

from __future__ import annotations

import functools


def refuse_renamed(cls, renamed: dict[str, str]):
    """Wrap `cls.__init__` so an old field name fails with its new name (not a bare 'unexpected keyword')."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        old = [k for k in kwargs if k in renamed]
        if old:
            raise TypeError(
                f"{cls.__name__}: " + ", ".join(f"`{k}` is now `{renamed[k]}`" for k in old) + " (field names are "
                "unique across TrainingArguments and the hf_compress configs, so one HfArgumentParser parses them "
                "all): rename " + ", ".join(f"{k}= to {renamed[k]}=" for k in old) + "."
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.renamed_fields = dict(renamed)  # old name -> new name (the recipe loader names the new key too)
    return cls
