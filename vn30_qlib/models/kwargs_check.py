"""Unknown model kwargs in a workflow are errors that name the nearest valid key.

A misspelt key would otherwise be a bare ``TypeError`` without a hint (our models) or, for LightGBM, a warning
in the training log and a silently default parameter (``num_leavs: 210`` trains with 31 leaves).
"""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Iterable, TypeVar

ModelClass = TypeVar("ModelClass", bound=type)


def check_kwargs(owner: str, given: Iterable[str], valid: Iterable[str], reference: str = "") -> None:
    """Raise a `TypeError` naming every key of ``given`` (names, or a kwargs dict) not in ``valid``, each with
    the nearest valid key; the valid keys are listed when few, else ``reference`` says where to find them."""
    valid = sorted(set(valid))
    unknown = [key for key in given if key not in valid]
    if not unknown:
        return
    problems = []
    for key in unknown:
        nearest = difflib.get_close_matches(str(key), valid, n=1)
        problems.append(f"{key!r} (did you mean {nearest[0]!r}?)" if nearest else repr(key))
    listing = ", ".join(valid) if len(valid) <= 40 else reference
    raise TypeError(f"{owner}: unknown kwarg {', '.join(problems)}" + (f"; valid kwargs: {listing}" if listing else ""))


def constructor_kwargs(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts by name: its ``__init__``'s, and where that passes ``**kwargs``
    on, those of the base classes' ``__init__`` it reaches (the sequence models' shared training kwargs)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in parameters
                  if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def checked_kwargs(cls: ModelClass) -> ModelClass:
    """Class decorator: an unknown constructor kwarg raises `check_kwargs`'s error instead of Python's."""
    init = cls.__init__
    valid = constructor_kwargs(cls)

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        check_kwargs(cls.__name__, kwargs, valid)
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls
