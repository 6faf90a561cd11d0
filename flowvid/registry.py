"""Named registries, one per interface kind, and plugin discovery through entry points.

Built-ins register with a decorator::

    @BLOCKS.register("affine")
    class AffineBlock(FlowBlock): ...

Installed packages register through the entry-point group of a kind, for example in their
``pyproject.toml``::

    [project.entry-points."flowvid.blocks"]
    gated = "my_package.blocks:GatedAffineBlock"

``load_plugins()`` imports every entry point once, so that a plugin is known both to its registry
(look-up by short name) and to jsonargparse (look-up by class name or ``class_path`` in YAML).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata as metadata
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator


@dataclass(frozen=True)
class Entry:
    """One registered object and where it comes from."""

    name: str
    obj: Any

    @property
    def class_path(self) -> str:
        return describe(self.obj)

    @property
    def package(self) -> str:
        return distribution_of(self.obj)

    @property
    def version(self) -> str:
        return _distribution_of(_module_of(self.obj).split(".")[0])[1]


def describe(obj: Any) -> str:
    """``module.QualName`` of a class or function; a factory such as ``functools.partial`` names what it calls."""
    if isinstance(obj, functools.partial):
        return f"functools.partial({describe(obj.func)}, ...)"
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{_module_of(obj)}.{qualname}"


def imported(class_path: str) -> Any:
    """The object an import path names (``package.module.Name``)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def package_of(obj: Any) -> str | None:
    """The top-level package that defines ``obj`` (``flowvid``, ``my_package``): what tells apart two classes
    that two installed packages register under one short name. An import name, not a distribution's, so
    that it is the same installed or run from a source tree. None for a script's class (``__main__``),
    which is the same class when a module imports it later."""
    package = _module_of(obj).split(".")[0]
    return None if package == "__main__" else package


def distribution_of(obj: Any) -> str:
    """The installed package (distribution) that provides ``obj``, as ``pip`` names it; the top-level import
    name for one run from a folder that is not installed."""
    return _distribution_of(_module_of(obj).split(".")[0])[0]


def registered_as(obj: Any) -> tuple[str, str] | None:
    """The kind and the name ``obj`` is registered under (``("block", "affine")``), else None."""
    load_plugins()
    for registry in REGISTRIES.values():
        name = registry.name_of(obj)
        if name is not None:
            return registry.kind, name
    return None


def with_package(identity: dict[str, Any], obj: Any) -> dict[str, Any]:
    """``identity`` with the ``package`` of ``obj`` added after its name, where it has one."""
    package = package_of(obj)
    if package is None:
        return identity
    name, *rest = identity.items()
    return dict([name, ("package", package), *rest])


def _module_of(obj: Any) -> str:
    if isinstance(obj, functools.partial):
        return _module_of(obj.func)
    return getattr(obj, "__module__", None) or type(obj).__module__


@functools.cache
def _distribution_of(top_level: str) -> tuple[str, str]:
    """The installed distribution that provides the top-level package ``top_level``, and its version.

    Asked when listed rather than at registration: a scan of the installed distributions takes a
    good tenth of a second, and every import of a module that registers something would pay it.
    """
    for dist in _distributions_by_package().get(top_level, []):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return top_level, "unknown"


@functools.cache
def _distributions_by_package() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def closest_name(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that ``name`` most likely misspells, letter case aside; None when none is close."""
    by_lower_case = {known.lower(): known for known in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower_case), n=1)
    return by_lower_case[close[0]] if close else None


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the one of ``names`` that ``name`` most likely misspells, else ``""``."""
    close = closest_name(name, names)
    return f" (did you mean {close!r}?)" if close else ""


def class_path_for(name: str) -> str | None:
    """What to write in a ``class_path`` instead of ``name`` when it is a registered short name there: the
    kind and the class it registers, and the import path of that class (``class_path`` takes import paths
    and class names, not short names). None when no registry holds a class under ``name``."""
    registered = [(registry.kind, entry.obj) for registry in REGISTRIES.values() for entry in registry
                  if entry.name == name and inspect.isclass(entry.obj)]
    if not registered:
        return None
    paths = [import_path(obj) for _, obj in registered]
    classes = " and ".join(f"the {kind} {path}" for (kind, _), path in zip(registered, paths))
    return (f"{name!r} is the short name of {classes}; class_path takes an import path, not a short name: "
            f"write class_path: {' or '.join(paths)}")


def import_path(cls: type) -> str:
    """The shortest ``package.Class`` path of ``cls``: a package that exports it (``flowvid.codecs.PixelCodec``),
    else the module that defines it."""
    parts = _module_of(cls).split(".")
    for end in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return describe(cls)


class UnknownName(KeyError):
    """A name no registry entry has: a KeyError (for callers that catch one) printed without quotes.

    ``str()`` of a plain KeyError is the ``repr`` of its message, so a CLI printing it would show the
    message wrapped in quotes; this one prints the message as it is.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Failure:
    """An entry point that could not be loaded, and why."""

    name: str
    value: str  # the entry point's ``module:attribute``
    package: str
    version: str
    error: str


class Registry:
    """Short names to classes (or factories) of one interface kind.

    ``base`` (``module:Class``, or None for any class) is the class every registered class must
    subclass; it is imported when first needed, since the modules that define the bases import this one.
    """

    def __init__(self, kind: str, group: str, base: str | None = None):
        self.kind = kind
        self.group = group
        self.base = base
        self._entries: dict[str, Entry] = {}
        self._failed: dict[str, Failure] = {}  # plugin names that did not load
        # The name each plugin's own package gives it, kept also when another package took that name first.
        self._claimed: dict[Any, str] = {}

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            self.check_kind(obj)
            if package_of(obj) != "flowvid":  # the built-ins register while flowvid's own modules load
                load_plugins()  # so that an installed plugin keeps its name whenever this is called
            self.add(name or obj.__name__, obj)
            return obj

        return decorator

    def check_kind(self, obj: Any) -> None:
        """Raise a TypeError unless ``obj`` is a subclass of the base, or a factory (not a class) of one."""
        base = self._base_class()
        made = obj.func if isinstance(obj, functools.partial) else obj
        if inspect.isclass(made) and not issubclass(made, base):
            raise TypeError(f"{describe(obj)} is not a subclass of {describe(base)}: a {self.kind} must "
                            f"subclass it")
        if not callable(made):
            raise TypeError(f"{describe(obj)} is not a {self.kind} class or factory: register a subclass of "
                            f"{describe(base)}")

    def _base_class(self) -> type:
        if self.base is None:
            return object
        module, _, qualname = self.base.partition(":")
        return getattr(importlib.import_module(module), qualname)

    def add(self, name: str, obj: Any) -> None:
        known = self._entries.get(name)
        if known is not None and known.obj is not obj:
            raise ValueError(
                f"{self.kind} name {name!r} is taken by {known.class_path} ({known.package}); "
                f"cannot register {describe(obj)} under it"
            )
        self._entries[name] = Entry(name, obj)

    def get(self, name: str) -> Any:
        load_plugins()
        try:
            return self._entries[name].obj
        except KeyError:
            if name in self._failed:
                failure = self._failed[name]
                raise UnknownName(f"{self.kind} {name!r} is installed by {_source(failure)} ({failure.value}) "
                                  f"but could not be loaded: {failure.error}") from None
            known = ", ".join(sorted(self._entries)) or "none"
            unread = "".join(f"; {unread_note(entry_point)}" for entry_point in unread_entry_points()
                             if entry_point.name == name)
            raise UnknownName(f"unknown {self.kind} {name!r}; registered: {known}{self._suggestion(name)}"
                              f"{unread}") from None

    def _suggestion(self, name: str) -> str:
        """``; did you mean 'x'?`` for a name close to a registered one; names are case-sensitive."""
        close = closest_name(name, self._entries)
        return f"; did you mean {close!r}?" if close else ""

    def name_of(self, obj: Any) -> str | None:
        """The name ``obj`` is registered under; for a plugin that lost its name to another package, the
        name its own package gives it. So the name (recorded in codec and text-encoder identities) does not
        depend on what else is installed."""
        for entry in self._entries.values():
            if entry.obj is obj:
                return entry.name
        try:
            return self._claimed.get(obj)
        except TypeError:  # an unhashable factory: never claimed
            return None

    def claim(self, name: str, obj: Any) -> None:
        """Record that ``obj``'s package registers it under ``name`` (whether or not it gets that name)."""
        try:
            self._claimed.setdefault(obj, name)
        except TypeError:  # an unhashable factory cannot be looked up by name_of either
            pass

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        load_plugins()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return [entry.name for entry in self]

    def failures(self) -> list[Failure]:
        """The installed plugins of this kind that could not be loaded, by name."""
        load_plugins()
        return sorted(self._failed.values(), key=lambda failure: failure.name)


def _source(failure: Failure) -> str:
    return f"{failure.package} {failure.version}" if failure.version else failure.package


BLOCKS = Registry("block", "flowvid.blocks", "flowvid.flows.base:FlowBlock")
PERMUTATIONS = Registry("permutation", "flowvid.permutations", "flowvid.flows.permutations:Permutation")
CODECS = Registry("codec", "flowvid.codecs", "flowvid.codecs.base:LatentCodec")
TEXT_ENCODERS = Registry("text encoder", "flowvid.text_encoders", "flowvid.text.base:TextEncoder")
SAMPLERS = Registry("sampler", "flowvid.samplers", "flowvid.sampling.base:Sampler")
FVD_EXTRACTORS = Registry("FVD extractor", "flowvid.fvd_extractors", "flowvid.metrics.extractor:FVDExtractor")
DATASETS = Registry("dataset", "flowvid.datasets", "lightning.pytorch:LightningDataModule")

REGISTRIES: dict[str, Registry] = {
    "blocks": BLOCKS,
    "permutations": PERMUTATIONS,
    "codecs": CODECS,
    "text_encoders": TEXT_ENCODERS,
    "samplers": SAMPLERS,
    "fvd_extractors": FVD_EXTRACTORS,
    "datasets": DATASETS,
}

# Modules whose import registers the built-ins of each kind.
_BUILTIN_MODULES = (
    "flowvid.flows",
    "flowvid.sampling",
    "flowvid.codecs",
    "flowvid.text",
    "flowvid.metrics",
    "flowvid.data.datamodule",
)

_loaded = False


def load_plugins() -> None:
    """Import the built-ins and every installed entry point (once per process).

    A plugin that fails to import, or that takes a name already taken, is reported with a warning
    naming it, never silently dropped, and never takes the built-ins or the other plugins down with it.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real import error inside an existing module
                raise
    for registry in REGISTRIES.values():
        # By package, then name: which of two packages keeps a name must not hang on the order of sys.path.
        for entry_point in sorted(metadata.entry_points(group=registry.group), key=_package_and_name):
            try:
                obj = entry_point.load()
                registry.check_kind(obj)
                registry.claim(entry_point.name, obj)
                registry.add(entry_point.name, obj)
            except Exception as err:  # noqa: BLE001 - a broken plugin must not break the CLI or the others
                failure = _failure(entry_point, err)
                registry._failed.setdefault(entry_point.name, failure)
                warnings.warn(f"could not load {registry.kind} plugin {entry_point.name!r} of {_source(failure)} "
                              f"({entry_point.value}): {failure.error}", stacklevel=2)


def unread_entry_points() -> list[metadata.EntryPoint]:
    """The entry points of ``flowvid.*`` groups that no registry reads: most likely a misspelt group in a
    plugin's ``pyproject.toml``, which installs without a word and registers nothing."""
    read = {registry.group for registry in REGISTRIES.values()}
    found = metadata.entry_points()
    return [entry_point for group in sorted(found.groups) if group.startswith("flowvid") and group not in read
            for entry_point in found.select(group=group)]


def unread_note(entry_point: metadata.EntryPoint) -> str:
    """What an ``unread_entry_points`` entry is, and the group it was likely meant for."""
    dist = getattr(entry_point, "dist", None)
    groups = [registry.group for registry in REGISTRIES.values()]
    return (f"{dist.name if dist is not None else 'a package'} declares {entry_point.name!r} in the entry-point "
            f"group {entry_point.group!r}, which flowvid does not read{did_you_mean(entry_point.group, groups)}")


def _package_and_name(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    return (dist.name if dist is not None else ""), entry_point.name


def _failure(entry_point: metadata.EntryPoint, err: Exception) -> Failure:
    dist = getattr(entry_point, "dist", None)
    package, version = (dist.name, dist.version) if dist is not None else ("an unknown package", "")
    return Failure(entry_point.name, entry_point.value, package, version, str(err) or type(err).__name__)


def resolve(registry: Registry, spec: Any) -> Any:
    """A registered short name becomes its object; anything else is returned as given."""
    if isinstance(spec, str):
        return registry.get(spec)
    return spec


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def check_arguments(what: str, factory: Callable[..., Any], arguments: dict[str, Any], option: str) -> None:
    """Raise a ValueError unless ``factory`` takes ``arguments`` by name, saying which it does take."""
    if _takes_no_arguments(factory):  # a class without its own __init__: torch.nn.Module's (*args, **kwargs)
        if arguments:
            raise ValueError(f"{what} takes no arguments, got {', '.join(map(repr, arguments))} (in {option})")
        return
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to check against (a builtin): the call itself will tell
        return
    named = [p for p in parameters if p.kind in _NAMED]
    names = [p.name for p in named]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if takes_any and inspect.isclass(factory):  # its **kwargs may go on to the classes it inherits from
        names, takes_any = _init_arguments(factory)
    accepted = ", ".join(names) or "none"
    unknown = [key for key in arguments if key not in names]
    if unknown and not takes_any:
        raise ValueError(f"{what} takes no argument {', '.join(map(repr, unknown))} (in {option}); "
                         f"its arguments are: {accepted}")
    missing = [p.name for p in named if p.default is inspect.Parameter.empty and p.name not in arguments]
    if missing:
        raise ValueError(f"{what} needs the argument {', '.join(map(repr, missing))}: give it in {option} "
                         f"(its arguments are: {accepted})")


def _takes_no_arguments(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` is a class whose ``__init__`` is ``object``'s or ``torch.nn.Module``'s.

    Their signatures are ``(*args, **kwargs)`` (``nn.Module`` only passes them on to refuse them), so a
    signature check would accept anything and the call would end in a TypeError from inside torch.
    """
    if not inspect.isclass(factory):
        return False
    if factory.__new__ is not object.__new__:  # a __new__ of its own may take the arguments
        return False
    init = factory.__init__
    if init is object.__init__:
        return True
    nn = sys.modules.get("torch.nn")  # not imported: ``factory`` cannot be a torch module
    return nn is not None and init is nn.Module.__init__


def accepted_arguments(cls: type) -> list[str]:
    """The arguments ``cls`` takes by name: those of its ``__init__``, and where that passes ``**kwargs`` on
    (as a sampler plugin may to the built-in it extends), those of the classes it inherits from."""
    return _init_arguments(cls)[0]


def _init_arguments(cls: type) -> tuple[list[str], bool]:
    """``accepted_arguments`` and whether ``cls`` takes others too: a ``**kwargs`` that no ``__init__`` up
    its classes ends (or one that cannot be looked into)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            parameters = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):  # a builtin's: what it takes is unknown
            return list(dict.fromkeys(names)), True
        names += [p.name for p in parameters if p.name != "self" and p.kind in _NAMED]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return list(dict.fromkeys(names)), False
    return list(dict.fromkeys(names)), True
