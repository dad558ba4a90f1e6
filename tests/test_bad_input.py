"""Bad config and bad data end `train.py` with one line on stderr and exit code 2, before any
work and before the run directory exists (run in process: the errors come before jax
compiles anything)."""

import importlib.util
import json
import pathlib

import pytest

from conftest import tiny_text_overrides

ROOT = pathlib.Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)


def _main(run_dir, *overrides):
    return train_cli.main(["--config", "tiny", "--no-progress", f"train.run_dir={run_dir}",
                           *overrides])


@pytest.fixture
def bad_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nulls.jsonl").write_text("\n".join(json.dumps({"text": v})
                                                    for v in (None, [1, 2], 3, "")))
    return tmp_path


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=12"], "train.batch_size=12: must be divisible by the 8 batch shards"),
    (["train.grad_accum=2"], "train.grad_accum=2: micro-batches of 4 sequences do not split"),
    (["sharding.data=3"], "use 3 devices, but 8 are available"),
    (["sharding.data=1", "sharding.expert=8"],
     "model.moe.num_routed_experts=4: must be divisible by sharding.expert=8"),
    (["data.source=text", "data.paths=/nowhere/*.txt"], "'/nowhere/*.txt' does not exist"),
    (["data.source=text", "data.paths={dir}/empty.txt"], "empty.txt holds no usable document"),
    (["data.source=jsonl", "data.paths={dir}/nulls.jsonl"],
     "nulls.jsonl holds no usable document (records skipped: 4"),
])
def test_one_line_and_exit_2_before_the_run_directory(overrides, message, bad_sources, capsys):
    run_dir = bad_sources / "run"
    assert _main(run_dir, *[o.format(dir=bad_sources) for o in overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists()


def test_a_configured_end_of_document_token_must_exist(corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _main(run_dir, *tiny_text_overrides(corpus_dir), "data.eod_token=<eot>") == 2
    err = capsys.readouterr().err
    assert "data.eod_token='<eot>' is not a token" in err and not run_dir.exists()
