"""Shared fixtures: a small synthetic dataset, a private cache, a test-set loader, and spy adapters."""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fsad_bench import registry
from fsad_bench.adapter import Adapter, accepts
from fsad_bench.cli import main
from fsad_bench.data.dataset import CategorySplit
from fsad_bench.data.images import load_images, load_mask
from fsad_bench.data.synthetic import generate
from fsad_bench.protocols import Suite

SIZE = 64


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own model/data cache (no state leaks between tests)."""
    monkeypatch.setenv("FSAD_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Three synthetic categories at 64 px: 12 train, 6 good + 8 defective test images each."""
    return generate(
        tmp_path_factory.mktemp("synth") / "data",
        categories=3,
        seed=0,
        n_train=12,
        n_test_good=6,
        n_test_per_defect=2,
        size=SIZE,
    )


def demo_run_args(
    data_root, out, *extra: str, methods: str = "random", k: str = "1", runs: str = "1", image_size: str = "64"
) -> list[str]:
    """``fsad-bench run`` arguments: the demo suite on ``data_root`` into ``out``, no weights, then ``extra``."""
    return [
        "run",
        "--suite",
        "demo",
        "--data-root",
        str(data_root),
        "--methods",
        methods,
        "--k",
        k,
        "--runs",
        runs,
        "--weights",
        "none",
        "--image-size",
        image_size,
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="session")
def demo_args():
    """:func:`demo_run_args` (tests run with ``--import-mode=importlib``: conftest is not importable)."""
    return demo_run_args


#: Record fields that measure time, not numbers: runs that compute the same numbers differ only there.
TIMING_KEYS = frozenset(
    {
        "adapt_seconds",
        "train_seconds",
        "infer_seconds_per_image",
        "infer_warm_seconds_per_image",
        "peak_memory_mb",
        "finished_at",
        "operating_point_seconds",
    }
)


@pytest.fixture(scope="session")
def untimed():
    """A record without its :data:`TIMING_KEYS`: what two runs of the same command must share."""
    return lambda record: {k: v for k, v in record.items() if k not in TIMING_KEYS}


@pytest.fixture
def cli(capsys):
    """Run ``fsad-bench ARGS`` that must exit (SystemExit): returns (exit code, stdout, stderr)."""

    def run(args: list[str]) -> tuple[int | str | None, str, str]:
        with pytest.raises(SystemExit) as exc:
            main(args)
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def cli_exit():
    """Run ``fsad-bench ARGS``; returns its exit code (0 when it returns without SystemExit)."""

    def run(args: list[str]) -> int | str:
        try:
            main(args)
        except SystemExit as exc:
            return exc.code or 0
        return 0

    return run


def check_presets_declared(cls: type[Adapter]) -> None:
    """Every preset of adapter ``cls`` sets exactly its declared options, each to a value they accept."""
    for name, preset in cls.presets.items():
        assert set(preset) == set(cls.option_constraints), (cls.name, name)
        for key, value in preset.items():
            assert any(accepts(c, value) for c in cls.option_constraints[key]), (cls.name, name, key, value)


@pytest.fixture(scope="session")
def presets_declared():
    """:func:`check_presets_declared`."""
    return check_presets_declared


#: The ``slow`` method of :func:`slow_plugin`, a module of its own.
SLOW = '''
import os, time
from pathlib import Path
from fsad_bench.adapter import Adapter

class Slow(Adapter):
    """Training-free; adapt announces its worker's pid, then works for a minute."""
    name = "slow"
    protocol = "training-free"

    def adapt(self, support):
        Path(os.environ["SLOW_PIDS"], str(os.getpid())).touch()
        end = time.time() + float(os.environ.get("SLOW_SECONDS", "60"))
        while time.time() < end:
            sum(range(10000))

    def predict(self, images):
        import torch
        return torch.zeros(len(images)), torch.zeros(len(images), *images.shape[-2:])
'''


@pytest.fixture
def slow_plugin(tmp_path):
    """A method registered through an entry point (so loky workers see it too) that keeps a worker busy."""
    site = tmp_path / "site"
    (site / "slowplugin-0.1.dist-info").mkdir(parents=True)
    (site / "slowmod.py").write_text(textwrap.dedent(SLOW))
    (site / "slowplugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: slowplugin\nVersion: 0.1\n"
    )
    (site / "slowplugin-0.1.dist-info" / "entry_points.txt").write_text("[fsad_bench.methods]\nslow = slowmod:Slow\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "SLOW_PIDS": str(pids),
        "OMP_NUM_THREADS": "1",
    }
    return env, pids


@pytest.fixture(scope="session")
def demo_subprocess_args(demo_args):
    """:func:`demo_run_args` as a ``python -m fsad_bench.cli`` command line (for a subprocess)."""
    return lambda data_root, out, *extra, **kw: [
        sys.executable,
        "-m",
        "fsad_bench.cli",
        *demo_args(data_root, out, *extra, **kw),
    ]


@dataclass
class TestSet:
    """A category's test set in memory: images ``(N,3,S,S)``, labels ``(N,)``, masks ``(N,S,S)``."""

    __test__ = False  # not a test class

    images: torch.Tensor
    labels: np.ndarray
    masks: torch.Tensor
    paths: list[Path]
    defects: list[str]


def _load_test_set(split: CategorySplit, size: int) -> TestSet:
    """Load every test image and mask of a category at ``size``x``size`` (each mask checked
    against its image's size)."""
    images = load_images([s.path for s in split.test], size)
    masks = torch.stack([load_mask(s.mask_path, size, s.path) for s in split.test])
    labels = np.array([s.label for s in split.test], dtype=np.int64)
    return TestSet(images, labels, masks, [s.path for s in split.test], [s.defect for s in split.test])


@pytest.fixture(scope="session")
def load_test_set():
    """``load_test_set(split, size)`` -> :class:`TestSet` (a whole category's test set in memory)."""
    return _load_test_set


@pytest.fixture
def make_suite(synth_root):
    def make(**overrides) -> Suite:
        kw = dict(
            name="t",
            dataset="synthetic",
            data_root=str(synth_root),
            methods=["random"],
            k=[1, 2],
            runs=2,
            image_size=SIZE,
            weights="none",
            seed=0,
        )
        kw.update(overrides)
        return Suite(**kw)

    return make


class MeanDiff(Adapter):
    """Tiny real scorer for run-layer tests: |image - mean support image|, channel-averaged."""

    name = "meandiff"
    protocol = "training-free"
    fit_calls: list[dict] = []

    def fit(self, train):
        type(self).fit_calls.append({c: ds for c, ds in train.items()})

    def adapt(self, support):
        self.mean = support.mean(0)

    def predict(self, images):
        maps = (images - self.mean).abs().mean(1)
        return maps.flatten(1).max(1).values, maps


class AggregatedSpy(MeanDiff):
    name = "spy-agg"
    protocol = "aggregated"
    fit_calls: list[dict] = []

    def state_dict(self):
        return {"n": torch.tensor(1)}

    def load_state_dict(self, state):
        pass


class IndividualSpy(MeanDiff):
    name = "spy-ind"
    protocol = "individual"
    fit_calls: list[dict] = []


@pytest.fixture
def spies():
    """Register the spy adapters for one test."""
    classes = (MeanDiff, AggregatedSpy, IndividualSpy)
    for cls in classes:
        cls.fit_calls.clear()
        registry.register(cls)
    yield {cls.name: cls for cls in classes}
    for cls in classes:
        registry.unregister(cls.name)
