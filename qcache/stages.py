"""Declared, resumable pipeline stages: each product is a directory, built in a temporary sibling and renamed in.

A ``Stage`` is declared once: its name, what it reads (recipe values, inputs from outside the recipe such as the
model's fingerprint, and the upstream stages whose products it uses), and how its product is built, saved and
loaded. Its *key* is derived from exactly what it reads (``derive_key``), never written by hand. A stage directory
holds the product files and ``stage.json`` with that key. On a re-run a stage whose directory exists with the same
key is reused; one whose key changed is rebuilt; a stage killed half-way left only a ``.partial`` directory, which is
removed. So an interrupted ``qcache.compress`` resumes at the stage it was in, and a changed recipe, model or noise
schedule recomputes exactly the stages that read what changed. ``run_stages`` walks a list of stages in order;
products built in the run stay in memory, only reused ones are loaded from disk.

Several processes (``qcache.distributed``): every rank walks the same stages, and every rank runs each build (the
builds split their sampling across ranks). Rank 0 alone owns the store: it decides whether a stage is reused, builds
into the temporary directory and renames it in; the others build with no directory (``None``: write nothing) and
get rank 0's info, so the keys, infos and the order of exchanges are the same everywhere. A reused product is
loaded by another rank only if it asks for it, from the stage directory (which it must be able to read: one node,
or a shared filesystem). An error on any rank during a stage stops every rank with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .cli import json_bytes
from .fingerprint import umask

STAGE_FILE = "stage.json"


def stage_key(**parts: Any) -> str:
    """A short, stable hash of JSON-able ``parts`` (and the qcache version)."""
    blob = json.dumps({"qcache": __version__, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageResult:
    """Where a stage's product lies, the key it was built from, whether it was reused, and how long it took."""

    name: str
    path: Path
    key: str
    reused: bool
    seconds: float
    info: dict


class StageStore:
    """The ``stages/`` directory of one compress run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def load(self, name: str, key: str) -> StageResult | None:
        """The finished stage ``name`` if it was built from ``key``; else None."""
        path = self.root / name
        try:
            meta = json.loads((path / STAGE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("key") != key:
            return None
        return StageResult(name, path, key, True, float(meta.get("seconds", 0.0)), dict(meta.get("info") or {}))

    def run(self, name: str, key: str, build: Callable[[Path], dict | None]) -> StageResult:
        """Reuse stage ``name`` if it was built from ``key``, else call ``build(tmpdir)`` and move it into place.

        ``build`` writes the product into the directory it is given and may return a small JSON-able ``info`` dict
        that is kept in ``stage.json`` (sizes, timings, summary lines).
        """
        done = self.load(name, key)
        if done is not None:
            return done
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{name}.*.partial"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=self.root))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp gives 0700; a stage directory is as readable as any other
        t0 = time.perf_counter()
        try:
            info = build(tmp) or {}
            seconds = time.perf_counter() - t0
            meta = {"name": name, "key": key, "seconds": round(seconds, 3), "info": info}
            (tmp / STAGE_FILE).write_bytes(json_bytes(meta, default=str))
            final = self.root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StageResult(name, final, key, False, seconds, info)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once.

    ``recipe``: the dotted recipe paths it reads (``"cache"``, ``"calibration.pool_seed"``); ``inputs``: the names of
    values from outside the recipe it reads (``StageRun.inputs``: model fingerprint, scheduler config, ...);
    ``after``: the upstream stages whose products it uses. ``build(run, dir)`` computes the product, saves it into
    ``dir`` and returns (product, info); ``load(run, dir, info)`` reads a saved product back; ``skip(run)`` returns
    why the stage does not apply to this run (None: it does); ``summary(info)`` is its log line.
    """

    name: str
    build: Callable[[Any, Path], tuple[Any, dict]]
    load: Callable[[Any, Path, dict], Any]
    summary: Callable[[dict], str]
    recipe: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    skip: Callable[[Any], str | None] | None = None


@dataclass
class StageRun:
    """What the stages of one run share: the plain recipe, the outside inputs, and per stage its key, info (None
    when skipped), timing and product (``product(name)``)."""

    recipe_dict: dict
    inputs: dict
    keys: dict = field(default_factory=dict)
    infos: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    products: dict = field(default_factory=dict)
    loaders: dict = field(default_factory=dict)

    def product(self, name: str) -> Any:
        """Stage ``name``'s product: as built in this run, or loaded from its directory on first use (so a reused
        product nobody asks for is never read); None for a skipped stage."""
        if name not in self.products:
            self.products[name] = self.loaders.pop(name)()
        return self.products[name]


def recipe_value(recipe: dict, path: str) -> Any:
    """The value at dotted ``path`` of a plain recipe dict."""
    value = recipe
    for part in path.split("."):
        value = value[part]
    return value


def derive_key(stage: Stage, run: StageRun) -> str:
    """The key of ``stage``: a hash of every recipe value, outside input and upstream key it declares it reads."""
    return stage_key(stage=stage.name, recipe={p: recipe_value(run.recipe_dict, p) for p in stage.recipe},
                     inputs={n: run.inputs[n] for n in stage.inputs}, after={n: run.keys[n] for n in stage.after})


def run_stages(stages: list[Stage], store: StageStore, run: StageRun, log: Callable[[str], None]) -> None:
    """Run (or reuse) each stage in order, filling ``run``'s keys, products, infos and timings.

    Under several processes every rank calls this; rank 0 reads and writes ``store`` and logs (module docstring)."""
    from .distributed import current

    d = current()
    if not d.is_main:
        log = _silent
    n = len(stages)
    for i, stage in enumerate(stages, 1):
        why = stage.skip(run) if stage.skip is not None else None
        if why is not None:
            log(f"[{i}/{n}] {stage.name}: skipped ({why})")
            run.keys[stage.name] = run.products[stage.name] = run.infos[stage.name] = None
            continue
        key = derive_key(stage, run)
        built: list = []

        def build(tmp: Path, stage: Stage = stage, built: list = built) -> dict:
            product, info = stage.build(run, tmp)
            built.append(product)
            return info

        log(f"[{i}/{n}] {stage.name} ...")
        if not d.active:
            res = store.run(stage.name, key, build)
        else:
            res = _run_distributed(d, store, stage.name, key, build)
        run.keys[stage.name], run.infos[stage.name] = key, res.info
        if built:
            run.products[stage.name] = built[0]
        else:
            run.loaders[stage.name] = lambda stage=stage, res=res: stage.load(run, res.path, res.info)
        run.timings[stage.name] = {"seconds": round(res.seconds, 2), "reused": res.reused}
        how = "reused from an earlier run" if res.reused else f"{res.seconds:.1f}s"
        log(f"[{i}/{n}] {stage.name}: {stage.summary(res.info)} ({how})")


def _silent(msg: str) -> None:
    pass


def _run_distributed(d, store: StageStore, name: str, key: str, build: Callable[[Path | None], dict | None]
                     ) -> StageResult:
    """``store.run`` on rank 0 and ``build(None)`` on the others, for one stage; every rank returns rank 0's result
    (its info and timing; the others keep the product they built)."""
    res = None
    with d.guard():
        if d.is_main:
            res = store.load(name, key)
    reused = d.broadcast(res is not None)
    if not reused:
        with d.guard():  # the builds exchange pieces inside; a failure on any rank ends here on all of them
            if d.is_main:
                res = store.run(name, key, build)
            else:
                build(None)
    return d.broadcast(res)
