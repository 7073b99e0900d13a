"""Start-up: the CLI module and the registry import no torch (lazy imports in the commands), ``fsad-bench
methods`` lists the built-ins from the registry's static table, kept equal to the classes here. Timing
lives in ``benchmarks/startup.py``, not in tests."""

from __future__ import annotations

import subprocess
import sys

from fsad_bench import registry

HEAVY = ("torch", "torchvision", "pandas", "sklearn", "scipy", "anomalib", "mlflow", "fsad_bench.adapter")


def _imported(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('imported:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("imported:"), res.stdout
    return [m for m in line[len("imported:") :].split(",") if m]


def test_cli_and_registry_import_no_torch():
    assert _imported("import fsad_bench.cli, fsad_bench.registry") == []


def test_methods_help_and_a_missing_data_root_answer_without_torch(tmp_path):
    code = f"""
from fsad_bench.cli import main
for args in (["methods"], ["--help"], ["run", "--suite", "quick", "--data-root", {str(tmp_path / "missing")!r}]):
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, 2), (args, e.code)
"""
    assert _imported(code) == []


def test_static_method_info_equals_the_classes():
    from fsad_bench.methods import anomalib_models

    for name in registry.BUILTIN:
        cls = registry.get(name)
        assert registry.INFO[name] == (cls.protocol, tuple(cls.presets), cls.paper), name
    for prefix, (models, _) in registry.PREFIXED.items():
        assert prefix == anomalib_models.PREFIX and models == tuple(anomalib_models.MODELS)
        for m in models:
            cls = anomalib_models.MODELS[m]
            assert registry.INFO[prefix + m] == (cls.protocol, tuple(cls.presets), cls.paper)
    assert set(registry.INFO) == set(registry.BUILTIN) | {p + m for p, (ms, _) in registry.PREFIXED.items() for m in ms}
    names = [n for n in registry.available() if n.startswith("anomalib:")]
    assert names == sorted(anomalib_models.names())
