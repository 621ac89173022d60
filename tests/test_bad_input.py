"""Bad input, one case per mistake: each entry point answers with one line naming the file, key or
value and what to do -- no traceback -- and leaves everything on disk as it was.

The cases call the entry points' main functions through pnet_dist.cli.run, in this process (a
subprocess each would cost seconds of imports; tests/test_launch.py runs the real
`python -m pnet_dist.launch` once). The job files, datasets and run folders are made per case in
a temp folder whose every file (name, size, mtime) is compared before and after.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from pnet_dist import cli
from pnet_dist.config import config_from_dict

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
VISION = {"run_name": "bad", "model": {"name": "parameternet_debug"},
          "data": {"kind": "image", "train_uri": "synthetic:", "image_size": 32},
          "train": {"max_steps": 10}, "checkpoint": {"uri": "runs"},
          "scaling": {"num_workers": 1}}
MOE = {"run_name": "bad", "model": {"name": "pnet_llama_debug_up_e4"},
       "data": {"kind": "text", "train_uri": "synthetic:", "seq_len": 16},
       "train": {"max_steps": 10}, "checkpoint": {"uri": "runs"}}


def merged(base: dict, **sections) -> dict:
    out = json.loads(json.dumps(base))
    for name, values in sections.items():
        if isinstance(values, dict):
            out.setdefault(name, {}).update(values)
        else:
            out[name] = values
    return out


def job_file(root: Path, raw: dict | str, name: str = "job.yaml") -> str:
    (root / name).write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return name


def fake_dataset(root: Path, name: str, **meta) -> str:
    """A folder that looks like a converted dataset to the pre-flight (dataset.json + index.json)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(meta))
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    return name


def old_run(root: Path, model_name: str) -> None:
    """runs/bad with a checkpoint of `model_name` (what the run folder of a trained run holds)."""
    run = root / "runs" / "bad"
    (run / "ckpt" / "step_00000010").mkdir(parents=True)
    (run / "ckpt" / "step_00000010" / "COMPLETE").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump(merged(VISION, model={"name": model_name})))


# Each case: (id, entry point, set-up(root) -> argv, expected text of the one error line).
def launch_case(raw, *overrides):
    return lambda root: ["pnet_dist.launch", job_file(root, raw), *overrides]


CASES = [
    ("yaml-tab", "launch", launch_case("run_name: bad\nmodel:\n\tname: parameternet_debug\n"),
     "job.yaml:3:1: not valid YAML: while scanning for the next token found character '\\t' that cannot start any "
     "token (indent with spaces; YAML does not allow tabs there)"),
    ("yaml-syntax", "launch", launch_case("run_name: bad\nmodel: {name: x\ndata: 3\n"),
     "job.yaml:3:5: not valid YAML: while parsing a flow mapping expected ',' or '}', but got ':'"),
    ("unknown-key", "launch", launch_case(merged(VISION, scaling={"num_worker": 2})),
     "job.yaml: unknown key 'scaling.num_worker'; allowed in scaling:"),
    ("wrong-type", "launch", launch_case(VISION, "train.max_steps=ten"),
     "job.yaml: train.max_steps: expected an integer, got 'ten' (str)"),
    ("max-failures", "launch", launch_case(VISION, "scaling.max_failures=-2"),
     "job.yaml: scaling.max_failures: must be >= 0, or -1 to restart without limit, got -2"),
    ("model-typo", "launch", launch_case(VISION, "model.name=parameternet_60m"),
     "job.yaml: model.name: unknown model 'parameternet_60m'; registered models: ghostnet_300m"),
    ("model-kwarg-type", "launch", launch_case(merged(VISION, model={"name": "parameternet_debug",
                                                                     "kwargs": {"num_classes": "10"}})),
     "job.yaml: model.kwargs: num_classes must be an integer, got '10' (str)"),
    ("model-kwarg-name", "launch", launch_case(merged(VISION, model={"name": "parameternet_debug",
                                                                     "kwargs": {"num_clases": 10}})),
     "job.yaml: model.kwargs: GhostNet.__init__() got an unexpected keyword argument 'num_clases'"),
    ("moe-zero3", "launch", launch_case(MOE, "deepspeed.zero_stage=3"),
     "job.yaml: deepspeed.zero_stage: 3 is not supported; use 2"),
    ("moe-offload", "launch", launch_case(MOE, "deepspeed.offload_optimizer=true"),
     "job.yaml: deepspeed.offload_optimizer: true is not supported"),
    ("no-dataset", "launch", launch_case(VISION, "data.train_uri=data/missing"),
     "job.yaml: data.train_uri: {root}/data/missing/dataset.json not found: {root}/data/missing is not a dataset "
     "written by tools/make_image_shards.py or tools/make_text_shards.py"),
    ("wrong-kind", "launch", lambda root: ["pnet_dist.launch", job_file(root, VISION),
                                           f"data.train_uri={fake_dataset(root, 'tok', kind='text', vocab_size=9, seq_len=16)}"],
     "job.yaml: data.train_uri={root}/tok holds a 'text' dataset (its dataset.json) but data.kind is 'image'"),
    ("seq-len", "launch", lambda root: ["pnet_dist.launch", job_file(root, MOE),
                                        f"data.train_uri={fake_dataset(root, 'tok', kind='text', vocab_size=9, seq_len=128)}"],
     "job.yaml: data.seq_len=16 but {root}/tok was written with seq_len 128; set data.seq_len=128"),
    ("vocab", "launch", lambda root: ["pnet_dist.launch", job_file(root, MOE),
                                      f"data.train_uri={fake_dataset(root, 'tok', kind='text', vocab_size=600, seq_len=16)}",
                                      "model.kwargs.vocab_size=512"],
     "job.yaml: model.kwargs.vocab_size=512 but the dataset {root}/tok has vocab_size=600"),
    ("resume-other-model", "launch", lambda root: (old_run(root, "ghostnet_debug"),
                                                   ["pnet_dist.launch", job_file(root, VISION)])[1],
     "job.yaml: model.name=parameternet_debug but the run {root}/runs/bad holds checkpoints of "
     "model.name=ghostnet_debug (its config.yaml)"),
    ("checkpoint-uri-file", "launch", lambda root: ((root / "afile").write_text("x"),
                                                    ["pnet_dist.launch", job_file(root, VISION),
                                                     "checkpoint.uri=afile/runs"])[1],
     "job.yaml: checkpoint.uri={root}/afile/runs: {root}/afile is a file, not a folder"),
    ("train-yaml-tab", "train", lambda root: ["pnet_dist.train", job_file(root, "a:\n\tb: 1\n")],
     "job.yaml:2:1: not valid YAML"),
    ("text-binary", "make_text_shards", lambda root: ((root / "random.txt").write_bytes(os.urandom(200_000)),
                                                      ["make_text_shards.py", "random.txt", "--out", "out",
                                                       "--train-vocab-size", "300"])[1],
     "random.txt: not UTF-8 text (byte "),
    ("images-per-part", "make_image_shards", lambda root: ((root / "src" / "n01").mkdir(parents=True),
                                                           ["make_image_shards.py", "src", "out",
                                                            "--images-per-part", "0"])[1],
     "images_per_part (--images-per-part) must be >= 1, got 0"),
    ("model-kwargs-json", "export_checkpoint", lambda root: ["export_checkpoint.py", "runs/bad", "out",
                                                             "--model-kwargs", "{num_classes: 10}"],
     "--model-kwargs '{num_classes: 10}' is not JSON (Expecting property name enclosed in double quotes at "
     "character 1)"),
]


def entry_point(name: str):
    if name == "launch":
        from pnet_dist import launch
        return launch.main
    if name == "train":
        from pnet_dist import train
        return train.main
    sys.path.insert(0, str(REPO / "tools"))
    try:
        module = __import__(name)
    finally:
        sys.path.remove(str(REPO / "tools"))
    return module.main


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case_id, program, make_argv, expected", CASES, ids=[case[0] for case in CASES])
def test_mistake_gets_one_line_and_changes_nothing(case_id, program, make_argv, expected, tmp_path, monkeypatch,
                                                   capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PNET_LOG_LEVEL", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setattr(sys, "argv", make_argv(tmp_path))
    prog = sys.argv[0]
    before = snapshot(tmp_path)
    capsys.readouterr()
    status = cli.run(entry_point(program), prog=prog)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert status == cli.EXIT_USER_ERROR, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected.replace("{root}", str(tmp_path)) in errors[0], errors[0]
    assert snapshot(tmp_path) == before, "a failed start must not change anything on disk"


def test_debug_flag_adds_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pnet_dist.launch", job_file(tmp_path, VISION), "model.name=nope", "--debug"])
    monkeypatch.setenv("PNET_LOG_LEVEL", "INFO")   # cli.run sets DEBUG for its child processes; put it back after
    assert cli.run(entry_point("launch"), prog="pnet_dist.launch") == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("pnet_dist.launch: error: ")


def test_relative_path_under_a_ray_working_dir_copy_is_refused(tmp_path, monkeypatch, capsys):
    """Under `ray job submit --working-dir`, the driver runs in Ray's copy: relative paths would
    be read and written there and lost with the Ray session."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}))
    monkeypatch.setattr(sys, "argv", ["pnet_dist.launch", job_file(tmp_path, VISION)])
    before = snapshot(tmp_path)
    assert cli.run(entry_point("launch"), prog="pnet_dist.launch") == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"job.yaml: checkpoint.uri=runs is a relative local path, but this job runs in Ray's temporary copy of " \
           f"its working_dir ({tmp_path})" in err
    assert snapshot(tmp_path) == before


def test_local_paths_on_a_cluster_of_several_machines_are_refused_unless_shared():
    from pnet_dist.preflight import check_paths
    cfg = config_from_dict(merged(VISION, checkpoint={"uri": "/data/runs"}))
    check_paths(cfg, "job.yaml", single_machine=True)
    with pytest.raises(ValueError, match=r"job.yaml: checkpoint.uri=/data/runs is a local path, but the job's workers "
                                         r"run on other machines.*scaling.shared_filesystem=true"):
        check_paths(cfg, "job.yaml", single_machine=False)
    check_paths(config_from_dict(merged(VISION, checkpoint={"uri": "/nfs/runs"}, scaling={"shared_filesystem": True})),
                "job.yaml", single_machine=False)
    check_paths(config_from_dict(merged(VISION, checkpoint={"uri": "s3://b/runs"})), "job.yaml", single_machine=False)


def test_s3_mistakes_are_reported_in_seconds(s3_bucket, tmp_path, monkeypatch, capsys):
    """A missing bucket, missing credentials and an endpoint that refuses connections: one line
    each, from the pre-flight, without minutes of retries; nothing is left in the bucket."""
    import boto3

    from pnet_dist.storage import split_s3
    monkeypatch.chdir(tmp_path)
    job = job_file(tmp_path, merged(VISION, checkpoint={"uri": f"{s3_bucket}/runs"}))
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    cases = [({}, ["checkpoint.uri=s3://no-such-bucket-e2e/runs"], "bucket 'no-such-bucket-e2e' does not exist"),
             ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
               "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}, [],
              "no AWS credentials found"),
             ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}, [], "cannot reach s3://")]
    for env, overrides, expected in cases:
        with monkeypatch.context() as patch:
            for name, value in env.items():
                if value is None:
                    patch.delenv(name, raising=False)
                else:
                    patch.setenv(name, value)
            patch.setattr(sys, "argv", ["pnet_dist.launch", job, *overrides])
            assert cli.run(entry_point("launch"), prog="pnet_dist.launch") == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, err
    bucket, _ = split_s3(s3_bucket)
    assert boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_create_model_names_a_kwarg_of_the_wrong_type():
    from pnet_dist.models import create_model
    with pytest.raises(ValueError, match=r"num_classes must be an integer, got '10' \(str\)"):
        create_model("parameternet_debug", num_classes="10")
    with pytest.raises(ValueError, match=r"vocab_size must be int, got '10' \(str\)"):
        create_model("llama_debug", device="meta", vocab_size="10")
