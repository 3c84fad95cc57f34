"""Name -> Quantizer class, for built-ins and for third-party plugins.

Built-ins register with `@register("name")`. A plugin package advertises its class in its own
pyproject.toml::

    [project.entry-points."qconvert.quantizers"]
    hqq = "qconvert_hqq:HQQQuantizer"

Plugins are imported lazily, only when their name is asked for, so a broken plugin cannot break
`qconvert --help` or conversions that do not use it.
"""

import importlib.metadata

from qconvert.errors import SchemeError
from qconvert.quantizers.base import Quantizer

ENTRY_POINT_GROUP = "qconvert.quantizers"

_registry: dict[str, type[Quantizer]] = {}


def normalize_name(name: str) -> str:
    """Registry keys are lowercase with underscores: "GPTQ", "my-quant" -> "gptq", "my_quant"."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register(name: str):
    """Class decorator that registers a Quantizer subclass under `name`.

    Raises:
        TypeError: the class is not a Quantizer subclass.
        ValueError: the name is taken by another class.
    """
    key = normalize_name(name)

    def decorator(cls: type[Quantizer]) -> type[Quantizer]:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"cannot register {cls!r} as quantizer {key!r}: it is not a Quantizer subclass")
        if key in _registry and _registry[key] is not cls:
            raise ValueError(f"quantizer name {key!r} is already registered to {_registry[key].__qualname__}")
        cls.name = key
        _registry[key] = cls
        return cls

    return decorator


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {normalize_name(ep.name): ep for ep in found}


def available() -> list[str]:
    """Every quantizer name, built in or advertised by an installed plugin (none are imported)."""
    _load_builtins()
    return sorted(set(_registry) | set(_entry_points()))


def get(name: str) -> type[Quantizer]:
    """The Quantizer class registered as `name`, importing its plugin if needed.

    Raises:
        SchemeError: no such quantizer, or its plugin failed to load.
    """
    _load_builtins()
    key = normalize_name(name)
    if key in _registry:
        return _registry[key]
    entry_point = _entry_points().get(key)
    if entry_point is None:
        raise SchemeError(f"unknown quantizer {name!r}; available: {', '.join(available())}.")
    try:
        cls = entry_point.load()
    except Exception as exc:  # a plugin's own bug must not look like ours
        raise SchemeError(f"quantizer plugin {key!r} ({entry_point.value}) failed to load: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise SchemeError(f"quantizer plugin {key!r} ({entry_point.value}) is not a qconvert Quantizer subclass.")
    return register(key)(cls)


def _load_builtins() -> None:
    # Importing the package runs the @register decorators of the built-in quantizers.
    import qconvert.quantizers  # noqa: F401
