"""Sharded runs: rank resolution, a remainder-safe balanced split, and 2 worker processes whose
merged results equal a 1-process run exactly."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from camloc.cli.app import app
from camloc.datasets import ImagePairs, Pair
from camloc.errors import CamlocError
from camloc.run.sharding import assign_images, local_rank, record_files, resolve_shard


def test_resolve_shard_from_option_and_launchers():
    assert resolve_shard(None, {}) == (0, 1)
    assert resolve_shard("1/3", {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3)  # the option wins
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2)
    assert resolve_shard(None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == (3, 4)
    assert local_rank({"SLURM_LOCALID": "2"}) == 2 and local_rank({}) is None
    with pytest.raises(CamlocError, match="shard 2/2 is out of range"):
        resolve_shard("2/2", {})
    with pytest.raises(CamlocError, match="must look like i/n"):
        resolve_shard("half", {})


def _images(counts):
    return [ImagePairs(f"{i}.jpg", i, [Pair(i, f"{i}.jpg", (4, 4), c, str(c), str(c)) for c in range(n)])
            for i, n in enumerate(counts)]


@pytest.mark.parametrize("world", [1, 2, 3, 5, 11])
def test_assignment_covers_every_image_once_and_balances_pairs(world):
    images = _images([3, 1, 1, 2, 5, 1, 1, 4, 2, 2])
    shares = [assign_images(images, r, world) for r in range(world)]
    ids = sorted(i.image_id for share in shares for i in share)
    assert ids == list(range(10))  # nothing dropped, nothing twice
    loads = [sum(len(i.pairs) for i in share) for share in shares]
    if world <= 10:
        assert max(loads) - min(loads) <= 5  # at most one image's worth apart
    assert shares == [assign_images(images, r, world) for r in range(world)]  # deterministic


def test_shard_option_out_of_range_on_the_cli(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--method", "gradcam", "--model", "tiny-rn", "--out", str(tmp_path),
                                      "--shard", "2/2"])
    assert result.exit_code == 2 and "shard 2/2 is out of range" in result.output


def test_two_workers_merge_to_the_single_process_result(tmp_path):
    methods = "gradcam,layercam,scorecam"
    base = [sys.executable, "-m", "camloc", "eval", "--method", methods, "--model", "tiny-rn", "--device", "cpu",
            "--no-progress"]
    single = subprocess.run(base + ["--out", str(tmp_path / "single")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    shared = tmp_path / "sharded"
    workers = [subprocess.Popen(base + ["--out", str(shared)], env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    files = record_files(shared)
    assert [f.name for f in files] == ["pairs.rank000-of-002.jsonl", "pairs.rank001-of-002.jsonl"]
    keys = [(r["image_id"], r["category_id"], r["method"]) for f in files for r in map(json.loads, f.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 13 * 3  # every pair once, across the two shards
    assert all(f.read_text() for f in files)  # both ranks did work
    merged = CliRunner().invoke(app, ["report", str(shared), "--format", "csv"])
    one = CliRunner().invoke(app, ["report", str(tmp_path / "single"), "--format", "csv"])
    assert merged.exit_code == 0 and merged.stdout == one.stdout  # exactly equal
    # the last rank to finish wrote a complete summary and table
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["complete"] is True
    pd.testing.assert_frame_equal(pd.read_csv(shared / "table.csv"), pd.read_csv(tmp_path / "single" / "table.csv"))


def test_torchrun_with_a_gloo_group_rank0_writes_the_merged_table(tmp_path):
    """torchrun on the CPU: the ranks join a gloo group, rank 0 waits for the other and writes the tables."""
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "camloc", "eval",
           "--method", "gradcam,layercam", "--model", "tiny-rn", "--out", str(out), "--device", "cpu", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shard 1/2 done; rank 0 writes the merged tables" in result.stdout
    assert len(record_files(out)) == 2
    single = tmp_path / "single"
    from camloc.run.eval import run_eval
    from camloc.run.identity import EvalConfig

    run_eval(EvalConfig(model="tiny-rn", methods=["gradcam", "layercam"]), single, device="cpu", progress=False)
    assert (out / "table.csv").read_text() == (single / "table.csv").read_text()
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_force_new_on_a_shard_without_a_process_group_is_refused(tmp_path):
    """Independent shards cannot coordinate a reset: one would delete the others' new records."""
    (tmp_path / "pairs.rank001-of-002.jsonl").write_text('{"kept": true}\n')
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-rn", "--method", "gradcam", "--out", str(tmp_path),
                                      "--shard", "0/2", "--force-new", "--no-progress"])
    assert result.exit_code == 2
    assert "--force-new with a sharded run (0/2)" in result.output and "torchrun" in result.output
    assert (tmp_path / "pairs.rank001-of-002.jsonl").read_text() == '{"kept": true}\n'  # nothing deleted
