"""Finishing a run: summary.json and the tables from every records file of the folder (all shards)."""
from __future__ import annotations

from pathlib import Path

from camloc.datasets import ImagePairs, count_pairs
from camloc.datasets.registry import dataset_label
from camloc.errors import RunFolderError
from camloc.evaluators import LocalizationMeter, meters_by
from camloc.evaluators.meter import record_key
from camloc.evaluators.protocols import PROTOCOL_COLUMNS
from camloc.run.files import atomic_write_text, read_run_records, write_json
from camloc.run.identity import SUMMARY, EvalConfig
from camloc.run.provenance import git_commit, package_versions

TABLE_COLUMNS = ["model", "dataset", "method", "n_pairs", "mean_iou", "acc@0.3", "acc@0.5", "acc@0.7"]
BOX_COLUMNS = TABLE_COLUMNS[4:]


def without_unscored_box_columns(table):
    """`table` (a DataFrame of method rows) without the box columns when no row has a box IoU (runs on point labels,
    whose pairs have no boxes): blank columns would read as a result."""
    return table.drop(columns=BOX_COLUMNS) if table["mean_iou"].isna().all() else table


def mean_coverage(images: list[ImagePairs]) -> float | None:
    """Mean fraction of the image the pair's class covers (docs/protocol.md §6), over pairs that have masks."""
    values = [p.coverage for item in images for p in item.pairs if p.coverage is not None]
    return sum(values) / len(values) if values else None


def write_tables(run_dir: Path, rows: list[dict]) -> None:
    """table.csv / table.md: one row per method; the columns of the protocols beyond box where present."""
    import pandas as pd

    table = without_unscored_box_columns(pd.DataFrame(
        rows, columns=TABLE_COLUMNS + [c for c in PROTOCOL_COLUMNS if any(c in r for r in rows)]))
    atomic_write_text(run_dir / "table.csv", table.to_csv(index=False, float_format="%.6f"))
    atomic_write_text(run_dir / "table.md", table.to_markdown(index=False, floatfmt=".4f") + "\n")


def finished_at() -> str:
    """When a summary was written: UTC, ISO 8601 to the second."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def finish_run(run_dir: Path, config: EvalConfig, model_name: str, images: list[ImagePairs], shard: tuple[int, int],
               skip_bad_records: bool, *, device: str, timings: dict, faults: dict) -> tuple[dict, list[dict]]:
    """Summary and tables of a run folder from every records file in it (all shards). A shard that
    does not see every record keeps its view aside (`summary.rankRRR-of-NNN.json`); the summary of a
    complete view replaces summary.json and the tables. A method with no record at all is an error
    (after the summary is written, with the faults that explain it). Returns (summary, records)."""
    from camloc.report.leaderboard import rate

    rank, world = shard
    bad: list = []
    records = read_run_records(run_dir, skip_bad_records, bad)
    meters = meters_by(records)
    rows, per_method = [], {}
    by_method: dict[str, list] = {}
    for record in records:
        by_method.setdefault(record["method"], []).append(record)
    for method in config.methods:
        meter = meters.get(method, LocalizationMeter())
        result = meter.compute()
        per_method[method] = {**result, "per_class": meter.compute_per_class(),
                              "pairs_per_second": rate(by_method.get(method, []))}
        rows.append({"model": model_name, "dataset": dataset_label(config.dataset, config.data), "method": method,
                     **result})
    summary = {
        "config": config.to_json(),
        "model": model_name,
        "dataset": dataset_label(config.dataset, config.data),
        "n_images": len(images),
        "n_pairs": count_pairs(images),
        "complete": len({record_key(r) for r in records}) == count_pairs(images) * len(config.methods),
        "shard": [rank, world],
        "mean_coverage": mean_coverage(images),
        "seed": config.seed,
        "device": device,
        "precision": config.precision,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "finished_at": finished_at(),
        "timings": timings,
        "faults": {**faults, "bad_record_lines": [{"file": f, "line": n, "problem": why} for f, n, why in bad]},
        "methods": per_method,
    }
    if world > 1 and not summary["complete"]:
        # other shards are still running: keep this rank's view aside; a rank that sees every record
        # writes summary.json and the tables, so an incomplete view never replaces a complete one
        write_json(run_dir / f"summary.rank{rank:03d}-of-{world:03d}.json", summary)
        return summary, records
    write_json(run_dir / SUMMARY, summary)
    empty = [m for m in config.methods if not per_method[m]["n_pairs"]]
    if empty:
        (run_dir / "table.csv").unlink(missing_ok=True)
        (run_dir / "table.md").unlink(missing_ok=True)
        skipped = faults.get("skipped_images") or []
        why = (f"all {len(skipped)} images with pending pairs were unreadable (listed in summary.json's faults)"
               if skipped else "no records were written")
        raise RunFolderError(f"no pair was scored for {', '.join(empty)}: {why}; no table written")
    write_tables(run_dir, rows)
    return summary, records
