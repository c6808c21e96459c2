"""The versions one server answers: a registered model's versions on one base, its aliases followed live.

    versions = ServedVersions.open("models:/quickstart@champion")   # or models:/NAME/3, runs:/..., a folder
    version = versions.resolve("quickstart@previous")               # NAME, NAME@ALIAS or NAME/VERSION
    versions.follow()                                               # a thread: aliases re-read every 2 s

A version registered with its adapter is served as its gate judged it (docs/architecture.md): the
adapter on the unquantised base in the dtype it recorded. Versions whose base, kind and dtype agree
share one model in memory (a batching.Engine), one PEFT adapter each; a version without an adapter
(registered before adapters were kept), or whose base is not on this machine, is served from its
merged folder in a model of its own. Every aliased version is held, and `--all-versions` holds
every version; NAME/VERSION for another existing version loads it on first use. A version is never
unloaded while the server runs (an adapter is a few MB), so a request never finds its version gone.

A model that is not a registry version (runs:/..., a folder) is served alone as NAME/local, NAME
being its registry.model_name.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from loraflow.config import Config
from loraflow.serving.batching import Engine
from loraflow.serving.requests import context_length

logger = logging.getLogger(__name__)
FOLLOW_SECONDS_ENV = "LORAFLOW_FOLLOW_SECONDS"  # how often a server re-reads the registry's aliases
FOLLOW_SECONDS = 2.0
LOCAL_VERSION = "local"  # the version label of a model served from outside the registry


class UnknownModel(LookupError):
    """A request named a model id this server does not answer (HTTP 404)."""


@dataclasses.dataclass(eq=False)
class Version:
    """One servable version: its settings, the engine that holds its model, and its adapter on that model."""
    name: str  # the registered model
    number: str  # the version ("local" outside the registry)
    cfg: Config
    engine: Engine
    adapter: str | None  # None: the engine's model is this version's merged folder
    created: int  # unix seconds
    metadata: object = None  # its MLmodel (mlflow.models.Model): the input schema /invocations parses by

    @property
    def id(self) -> str:
        return f"{self.name}/{self.number}"

    @property
    def context_tokens(self) -> int | None:
        return context_length(self.engine.model, self.engine.tokenizer)


def parse_source(source: str) -> tuple[str | None, str | None, str | None]:
    """(registered name, default alias, pinned version) of models:/NAME@ALIAS or models:/NAME/VERSION; Nones for
    any other model URI or folder (served alone)."""
    if not source.startswith("models:/") or source.startswith("models:/m-"):
        return None, None, None
    reference = source.removeprefix("models:/")
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return name, alias, None
    name, _, version = reference.rpartition("/")
    return (name, None, version) if name and version.isdigit() else (None, None, None)


def read_mlmodel(folder: Path) -> tuple[object, dict, dict]:
    """(the MLmodel, its model_config, {artifact name: path relative to the model}) of a loraflow pyfunc."""
    metadata = mlflow.models.Model.load(str(folder / "MLmodel"))
    flavour = metadata.flavors.get("python_function", {})
    artifacts = {name: spec["path"] for name, spec in (flavour.get("artifacts") or {}).items()}
    return metadata, flavour.get("config") or {}, artifacts


class ServedVersions:
    """The versions a server holds, and which version each model id names now."""

    def __init__(self, source: str, scratch: str | None = None, all_versions: bool = False):
        self.source, self.all_versions = source, all_versions
        self.name, self.alias, self.pinned = parse_source(source)
        self.scratch = Path(scratch or tempfile.mkdtemp(prefix="loraflow-versions-"))
        self.client = mlflow.MlflowClient()
        self.engines: dict[tuple, Engine] = {}  # (base, kind, dtype, remote code) -> the shared model
        self.versions: dict[str, Version] = {}  # number -> version
        self.aliases: dict[str, str] = {}  # alias -> number
        self.load_lock = threading.Lock()  # one version loads at a time
        self.stopped = threading.Event()

    @classmethod
    def open(cls, source: str, scratch: str | None = None, all_versions: bool = False) -> ServedVersions:
        """The versions of `source` loaded: every aliased version (and the pinned one) of a registered model, or
        the one model a URI or folder holds."""
        versions = cls(source, scratch, all_versions)
        if versions.name is None:
            versions.load_local()
        else:
            versions.refresh()
            if versions.default() is None:
                raise UnknownModel(f"{source} names no version in the registry")
        return versions

    # --- what a request names -------------------------------------------------------------------------------
    def default(self) -> Version | None:
        """The version /invocations and a bare NAME answer from: the pinned version, else the alias's."""
        if self.name is None:
            return next(iter(self.versions.values()), None)
        number = self.pinned or self.aliases.get(self.alias)
        return self.versions.get(number) if number else None

    def model_ids(self) -> list[tuple[str, Version]]:
        """Every id this server answers, with the version it names now: NAME, NAME@ALIAS, NAME/VERSION."""
        default = self.default()
        ids = [(self.public_name(), default)] if default else []
        ids += [(f"{self.name}@{alias}", self.versions[n]) for alias, n in sorted(self.aliases.items())
                if n in self.versions]
        return ids + [(v.id, v) for v in sorted(self.versions.values(), key=lambda v: int_or_zero(v.number))]

    def public_name(self) -> str:
        default = next(iter(self.versions.values()), None)
        return self.name or (default.name if default else "model")

    def resolve(self, model_id: str) -> Version:
        """The version `model_id` names (NAME, NAME@ALIAS, NAME/VERSION); UnknownModel otherwise."""
        name = self.public_name()
        if model_id == name and self.default() is not None:
            return self.default()
        if model_id.startswith(f"{name}@") and self.name is not None:
            number = self.aliases.get(model_id.split("@", 1)[1])
            if number in self.versions:
                return self.versions[number]
        if model_id.startswith(f"{name}/"):
            number = model_id.split("/", 1)[1]
            if number in self.versions:
                return self.versions[number]
            if self.name is not None and number.isdigit() and self.exists(number):
                return self.load_version(number)
        known = ", ".join(model_id for model_id, _ in self.model_ids())
        raise UnknownModel(f"the model {model_id!r} does not exist on this server; it serves {known}")

    def exists(self, number: str) -> bool:
        try:
            self.client.get_model_version(self.name, number)
            return True
        except MlflowException:
            return False

    # --- following the registry -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the aliases, load the versions they (or --all-versions) name that are not held yet, then switch
        to the new table at once: requests in flight keep the versions they resolved."""
        aliases = {alias: str(n) for alias, n in (self.client.get_registered_model(self.name).aliases or {}).items()}
        wanted = set(aliases.values()) | ({self.pinned} if self.pinned else set())
        if self.all_versions:
            wanted |= {str(v.version) for v in self.client.search_model_versions(f"name='{self.name}'")}
        for number in sorted(wanted - set(self.versions), key=int_or_zero):
            self.load_version(number)
        changed = {a: n for a, n in aliases.items() if self.aliases.get(a) != n}
        self.aliases = aliases
        for alias, number in changed.items():
            logger.info("%s@%s is now version %s", self.name, alias, number)

    def follow(self) -> threading.Thread | None:
        """Re-read the registry every $LORAFLOW_FOLLOW_SECONDS (2 s) on a daemon thread until `stop()`; a failed read
        (a locked store, a network error) is logged and retried, the table kept as it was."""
        if self.name is None:
            return None
        seconds = float(os.environ.get(FOLLOW_SECONDS_ENV) or FOLLOW_SECONDS)

        def loop():
            while not self.stopped.wait(seconds):
                try:
                    self.refresh()
                except Exception as exc:  # noqa: BLE001 - the server goes on with what it holds
                    logger.warning("could not re-read %s's aliases (%s); retrying in %g s", self.name,
                                   str(exc).splitlines()[0] if str(exc) else type(exc).__name__, seconds)

        thread = threading.Thread(target=loop, name="loraflow-follow", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopped.set()

    # --- loading ----------------------------------------------------------------------------------------------
    def load_version(self, number: str) -> Version:
        """Version `number` of the registered model, loaded once (adapter on a shared base, or merged)."""
        with self.load_lock:
            if number in self.versions:
                return self.versions[number]
            registered = self.client.get_model_version(self.name, number)
            root = self.client.get_model_version_download_uri(self.name, number)
            folder = self.scratch / f"v{number}"
            mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{root.rstrip('/')}/MLmodel",
                                                          dst_path=str(folder))
            version = self.build(Path(mlmodel).parent, root, number, int(registered.creation_timestamp) // 1000)
            self.versions[number] = version
            logger.info("holding %s (%s)", version.id, "adapter on the shared base" if version.adapter
                        else "its merged folder")
            return version

    def load_local(self) -> None:
        """The one model of a runs:/ or models:/m-... URI or a folder, as NAME/local."""
        path = Path(self.source)
        if not path.is_dir():
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=self.source, dst_path=str(self.scratch)))
        version = self.build(path, None, LOCAL_VERSION, int(time.time()))
        self.versions[LOCAL_VERSION] = version

    def build(self, folder: Path, root: str | None, number: str, created: int) -> Version:
        """A Version from a pyfunc folder holding at least its MLmodel: files not there yet come from `root`."""
        from loraflow.serving.text_model import served_base, serving_config

        metadata, settings, artifacts = read_mlmodel(folder)
        cfg = serving_config(settings)
        name = self.name or cfg.model_name
        if "adapter" in artifacts and cfg.model.name:
            probe = self.fetch(folder, root, f"{artifacts['model']}/config.json", folder / "merged-config")
            base = served_base(cfg, str(probe.parent))
            if base is not None:
                adapter_dir = self.fetch(folder, root, artifacts["adapter"])
                engine, adapter = self.adapter_on_shared_base(cfg, base, str(adapter_dir), number)
                return Version(name, number, cfg, engine, adapter, created, metadata)
        merged = self.fetch(folder, root, artifacts["model"])
        return Version(name, number, cfg, own_engine(cfg, str(merged)), None, created, metadata)

    @staticmethod
    def fetch(folder: Path, root: str | None, relative: str, into: Path | None = None) -> Path:
        """`folder`/`relative` (a file or folder of the model), downloaded from `root` when it is not there (a file
        into `into`); its local path."""
        local = folder / relative
        if local.exists() or root is None:
            return local
        uri = f"{root.rstrip('/')}/{relative}"
        if into is not None:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(local.parent)))

    def adapter_on_shared_base(self, cfg: Config, base: str, adapter_dir: str, number: str) -> tuple[Engine, str]:
        """(the engine of `base` in this version's kind and served dtype, the adapter's name on it): the first
        version loads the base with its adapter, later ones add theirs."""
        from loraflow import models

        key = (base, cfg.model.kind, models.name_of_dtype(models.served_dtype(cfg)), cfg.model.trust_remote_code)
        engine = self.engines.get(key)
        if engine is None:
            model, tokenizer = models.load_served(cfg, base, adapter_dir)
            model.eval()
            engine = self.engines[key] = Engine(model, tokenizer)
            return engine, model.active_adapter
        name = f"v{number}"
        engine.add_adapter(adapter_dir, name)
        return engine, name


def own_engine(cfg: Config, merged_dir: str) -> Engine:
    """An engine of its own for a merged folder, in the version's served dtype."""
    from loraflow import models

    model, tokenizer = models.load_model(cfg, merged_dir, quantize=False, dtype=models.served_dtype(cfg))
    model.eval()
    return Engine(model, tokenizer)


def int_or_zero(number: str) -> int:
    return int(number) if str(number).isdigit() else 0
