"""A checkpoint's config.json read by transformers and its model built on the meta device, every refusal one
sentence naming the field at fault.

transformers validates a config in several ways (a field's type, class validators such as
``validate_architecture``/``validate_layer_type``/``validate_rope``, the model type's registry) and some values
pass them all but fail while the model is built (a negative head count, an unknown activation).  Each of these
is turned into a :class:`ConfigFileError`.  The field is read from transformers' message where it names one;
otherwise it is found by elimination: the fields whose removal (back to the class default) makes the config
load, or the model build, are the ones at fault.  Elimination runs only on the error path.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re

import torch

from ..errors import ModelFileError, first_line

CONFIG = "config.json"


class ConfigFileError(ModelFileError):
    """config.json is valid JSON but transformers rejects it (a field's type or value, the model type)."""


@contextlib.contextmanager
def _quiet():
    """transformers' warnings about the file (unknown rope types, ...) would be a second line on stderr."""
    import transformers

    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(level)


def _reason(exc: BaseException) -> str:
    """transformers' own sentence: a strict dataclass error's cause carries it (the wrapper adds a header line)."""
    inner = exc.__cause__ or exc
    text = re.sub(r"^Field '[^']+' ", "", first_line(inner))  # (the sentence around it names the field)
    if isinstance(inner, KeyError):
        text = f"unknown value {inner.args[0]!r}" if inner.args else text
    return text.rstrip(".")


def _culprits(candidates: dict, data: dict, fails) -> list:
    """The fields among ``candidates`` whose removal from ``data`` makes ``fails(dict)`` false (elimination, one
    field at a time; identifying fields are never removed)."""
    out = []
    for key in candidates:
        if key in ("model_type", "architectures", "transformers_version"):
            continue
        trial = {k: v for k, v in data.items() if k != key}
        try:
            if not fails(trial):
                out.append(key)
        except Exception:  # noqa: BLE001 - still failing, differently: not this field alone
            continue
    return out


def _holding(data: dict, value) -> list:
    """Fields whose value is, or holds, ``value`` (an unknown key a family looked up: an activation name)."""
    return [k for k, v in data.items() if v == value or isinstance(v, dict) and value in v.values()]


def _named(data: dict, exc: BaseException, fails, defaults: dict) -> str:
    inner = exc.__cause__ or exc
    m = re.search(r"[Ff]ield '([^']+)'", str(inner))
    held = _holding(data, inner.args[0]) if isinstance(inner, KeyError) and inner.args else []
    # elimination only over the fields the file sets away from the class default (each trial builds a model)
    fields = [m.group(1)] if m else held or _culprits({k: v for k, v in data.items() if defaults.get(k, k) != v or
                                                         k in ("model_type", "architectures")}, data, fails)
    if not fields:
        return ""
    return f"field {fields[0]!r}" if len(fields) == 1 else "fields " + ", ".join(repr(f) for f in fields)


def _defaults(cls) -> dict:
    try:
        return cls().to_dict()
    except Exception:  # noqa: BLE001 - a class without a default instance: every field is a candidate
        return {}


def read_config(path: str, data: dict):
    """The transformers config of the checkpoint directory ``path`` (``data``: its parsed config.json)."""
    import transformers

    where = os.path.join(path, CONFIG)
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigFileError(f"{where} has no 'model_type' string: transformers cannot tell which family it is")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ConfigFileError(f"{where}: model_type {model_type!r} is not a family transformers "
                              f"{transformers.__version__} defines (custom code is never run)")
    archs = data.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ConfigFileError(f"{where}: field 'architectures' must be a list of class names, not {archs!r}")
    cls = transformers.CONFIG_MAPPING[model_type]

    def fails(trial: dict) -> bool:
        cls.from_dict(copy.deepcopy(trial))
        return False

    with _quiet():
        try:
            return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - strict dataclass errors, ValueError, TypeError, KeyError, ...
            field = _named(data, exc, fails, _defaults(cls))
            raise ConfigFileError(f"{where}: {cls.__name__} rejects {field or 'the file'}: {_reason(exc)}") from None


def build_meta(model_cls, config, path: str, data: dict):
    """``model_cls(config)`` on the meta device; a value transformers' validation let through but the model
    cannot be built from (a negative head count, an unknown activation) is one sentence naming the field."""
    def build(cfg):
        with torch.device("meta"):
            return model_cls(cfg)

    def fails(trial: dict) -> bool:
        build(type(config).from_dict(copy.deepcopy(trial)))
        return False

    with _quiet():
        try:
            return build(config)
        except Exception as exc:  # noqa: BLE001 - RuntimeError, ZeroDivisionError, KeyError, ... from the family
            field = _named(data, exc, fails, _defaults(type(config)))
            raise ConfigFileError(f"{os.path.join(path, CONFIG)}: {model_cls.__name__} cannot be built from "
                                  f"{field or 'this config'}: {_reason(exc)}") from None
