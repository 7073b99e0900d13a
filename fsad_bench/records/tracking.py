"""Optional MLflow tracking: one MLflow run per finished cell (``fsad-bench run --mlflow [URI]``).

The run layer calls :func:`after_record` once a cell's record is stored. It does nothing unless
tracking is switched on — by ``--mlflow`` on the command line, which sets the environment
variable ``FSAD_BENCH_MLFLOW`` to the tracking URI (inherited by local worker processes;
Dask workers on other machines need it in their own environment). Each cell becomes one run
in the experiment ``fsad-bench/<results folder name>``:

* run name and tag ``cell_id``; params: method, label, protocol, dataset, category, k, run,
  preset, weights, seed, image size, device, config hash, the method's hyper-parameters
  (``hparam.<name>``) and library versions (``version.<lib>``);
* metrics: every accuracy metric of the record (values in [0, 1]) and the costs
  (``adapt_seconds``, ``train_seconds``, ``infer_seconds_per_image``, ``peak_memory_mb``);
* artifacts: the record itself (``record.json``) and, where the run layer saved them, the
  example maps (``maps/<cell_id>.npz``).

Default URI (``--mlflow`` without a value): a local file store ``<results>/mlruns`` — MLflow
3 keeps its file store in maintenance mode, so ``MLFLOW_ALLOW_FILE_STORE=true`` is set for it;
any other URI (``sqlite:///path/mlflow.db``, ``http://host:5000``) is passed through unchanged.
Install with ``pip install 'fsad-bench[mlflow]'``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from fsad_bench.errors import FsadError

ENV = "FSAD_BENCH_MLFLOW"
#: Record fields logged as params / metrics (anything else numeric in the record is ignored).
PARAM_FIELDS = (
    "method",
    "label",
    "protocol",
    "dataset",
    "category",
    "k",
    "run",
    "preset",
    "weights",
    "seed",
    "train_seed",
    "image_size",
    "device",
    "config_hash",
    "n_support",
    "n_test",
    "train_dataset",
)
COST_FIELDS = ("adapt_seconds", "train_seconds", "infer_seconds_per_image", "peak_memory_mb")


def default_uri(out: str | Path) -> str:
    """The local file store under a results folder: ``file://<out>/mlruns``."""
    return (Path(out).resolve() / "mlruns").as_uri()


def enable(uri: str) -> str:
    """Switch tracking on for this process and its local workers; FsadError when mlflow is absent."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise FsadError("--mlflow needs MLflow: pip install 'fsad-bench[mlflow]'") from None
    os.environ[ENV] = uri
    return uri


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def params_of(record: dict[str, Any]) -> dict[str, str]:
    """MLflow params of a record (strings; nested hparams / versions flattened with dots)."""
    out = {f: str(record[f]) for f in PARAM_FIELDS if f in record and record[f] is not None}
    _flat("hparam", record.get("hparams") or {}, out)
    _flat("version", record.get("versions") or {}, out)
    return {k: v[:500] for k, v in out.items()}  # MLflow's param value limit


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a record: accuracy metrics and costs, finite values only."""
    from fsad_bench.metrics import METRICS

    out = {}
    for f in (*METRICS, *COST_FIELDS):
        v = record.get(f)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[f] = float(v)
    return out


def log_record(record: dict[str, Any], out: str | Path, uri: str) -> str:
    """Log one cell as one MLflow run at ``uri``; returns the run id."""
    import mlflow

    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=uri)
    name = f"fsad-bench/{Path(out).resolve().name}"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    run = client.create_run(exp_id, run_name=record["cell_id"], tags={"cell_id": record["cell_id"]})
    rid = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        ts = int(1000 * __import__("time").time())
        client.log_batch(
            rid,
            metrics=[Metric(k, v, ts, 0) for k, v in metrics_of(record).items()],
            params=[Param(k, v) for k, v in params_of(record).items()],
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "record.json"
            path.write_text(json.dumps(record, indent=1, sort_keys=True))
            client.log_artifact(rid, str(path))
        maps = Path(out) / "maps" / f"{record['cell_id']}.npz"
        if maps.is_file():
            client.log_artifact(rid, str(maps), artifact_path="maps")
    except Exception:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid)
    return rid


def after_record(record: dict[str, Any], out: str | Path) -> None:
    """Engine hook after a record is stored: log it when tracking is on (``$FSAD_BENCH_MLFLOW``)."""
    uri = os.environ.get(ENV)
    if uri:
        log_record(record, out, uri)
