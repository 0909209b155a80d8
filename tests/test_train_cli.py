"""`tagstream train` end to end: a bundle, the same-run baseline, and the HTML report with its plots."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tagstream.errors import ConfigError
from tagstream.synth import generate_catalog, write_jsonl

pytestmark = pytest.mark.slow


def train_cli(
    catalog: Path, out: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`tagstream train --catalog CATALOG --format jsonl --out OUT ARGS…` in a subprocess (`env` on top of ours)."""
    cmd = [sys.executable, "-m", "tagstream.cli", "train", "--catalog", str(catalog), "--format", "jsonl"]
    return subprocess.run(
        [*cmd, "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_train_writes_a_bundle_a_baseline_and_a_report(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(generate_catalog(600, seed=3), catalog)
    out = tmp_path / "models"
    run = train_cli(catalog, out, "--epochs", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = Path(run.stdout.strip().splitlines()[-1])
    assert (bundle / "model.onnx").is_file() and bundle.parent == out
    metrics = json.loads((bundle / "metrics.json").read_text())
    for group in ("category_l1", "category_l2", "category_leaf"):
        assert {"accuracy", "micro_f1", "macro_f1", "weighted_f1", "per_tag"} <= set(metrics["top1"]["groups"][group])
        assert 0 <= metrics["baseline"]["groups"][group]["weighted_f1"] <= 1
    assert metrics["parity"]["max_abs_diff"] <= 1e-4
    manifest = json.loads((bundle / "manifest.json").read_text())  # SPEC §2: the catalog file's sha256
    assert manifest["training_data_sha256"] == hashlib.sha256(catalog.read_bytes()).hexdigest()
    # none of the products `train --every`'s gate compares models on shaped its weights (they are its test part)
    from training.loaders import load_catalog
    from training.publish import eval_holdout
    from training.splits import read_trained_on, trained_on_key

    products = load_catalog(catalog, "jsonl").products
    gate = {trained_on_key(p) for p, held in zip(products, eval_holdout(products), strict=True) if held}
    trained_on = read_trained_on(metrics["trained_on"])
    assert gate and trained_on and not gate & trained_on
    assert metrics["split"]["test"] == len(gate)
    report = out / "reports" / bundle.name
    html = (report / "report.html").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs and all(name in html for name in pngs)
    assert "baseline" in html.lower() and "category_leaf" in html
    assert "baseline weighted_f1" in run.stderr
    # the products the report evaluated on, beside it: `evaluate` on them gives the report's figures
    held_out = report / "test.jsonl"
    assert f"held-out products: {held_out}" in run.stderr
    assert len(load_catalog(held_out, "jsonl").products) == metrics["split"]["test"]
    command = ["evaluate", "--model", str(bundle), "--catalog", str(held_out), "--format", "jsonl", "--json"]
    evaluated = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", *command],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(evaluated.stdout)
    for group, figures in metrics["top1"]["groups"].items():
        assert doc["groups"][group]["weighted_f1"] == pytest.approx(figures["weighted_f1"], abs=1e-6), group


TINY_ENV = {
    "TAGSTREAM_HASH_BITS": "12",
    "TAGSTREAM_MAX_FEATURES": "32",
    "TAGSTREAM_EMBED_DIM": "16",
    "TAGSTREAM_LINEAR_DIM": "8",
    "TAGSTREAM_HIDDEN": "[16]",
    "TAGSTREAM_EPOCHS": "2",
    "TAGSTREAM_REFIT_EPOCHS": "1",
    "TAGSTREAM_BATCH_SIZE": "32",
    "TAGSTREAM_MIN_SUPPORT": "3",
    "TAGSTREAM_PARITY_SAMPLES": "64",
}


def test_train_with_chinese_attribute_names_trains_and_plots_every_group(tmp_path: Path) -> None:
    import dataclasses

    renamed = {"colour": "颜色", "gender": "性别"}
    products = [
        dataclasses.replace(p, attributes={renamed.get(k, k): v for k, v in p.attributes.items()})
        for p in generate_catalog(400, seed=3)
    ]
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(products, catalog)
    out = tmp_path / "models"
    run = train_cli(catalog, out, "--no-baseline", env=TINY_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = Path(run.stdout.strip().splitlines()[-1])
    groups = json.loads((bundle / "metrics.json").read_text())["top1"]["groups"]
    assert {"颜色", "性别"} <= set(groups)
    report = out / "reports" / bundle.name
    pngs = list(report.glob("*.png"))
    # four plots per group, none overwriting another group's (颜色 and 性别 have no ASCII in their names)
    assert len(pngs) == 4 * len(groups), sorted(p.name for p in pngs)
    html = (report / "report.html").read_text()
    assert all(p.name in html for p in pngs) and "颜色" in html and "性别" in html


def test_train_prints_only_the_bundle_path_on_stdout_and_its_progress_on_stderr(tmp_path: Path) -> None:
    """`B=$(tagstream train ...)` is the bundle: Keras's epoch lines go to stderr, not stdout."""
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(generate_catalog(200, seed=5), catalog)
    out = tmp_path / "models"
    run = train_cli(
        catalog, out, "--no-baseline", env={**TINY_ENV, "TAGSTREAM_EPOCHS": "1", "TAGSTREAM_REFIT_EPOCHS": "1"}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    bundles = list(out.glob("2*"))
    assert len(bundles) == 1 and run.stdout == f"{bundles[0]}\n", run.stdout[-2000:]
    assert "/step - " in run.stderr and "loss: " in run.stderr  # the progress is kept, on stderr


NO_TOPICS = f"fixtrain-none-{uuid.uuid4().hex[:8]}-"  # a prefix no `tagstream topics` created
NGRAMS_5_3 = {"TAGSTREAM_CHAR_NGRAM_MIN": "5", "TAGSTREAM_CHAR_NGRAM_MAX": "3"}


@pytest.fixture
def tiny_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for k, v in TINY_ENV.items():
        monkeypatch.setenv(k, v)
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(generate_catalog(300, seed=3), catalog)
    return catalog


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--out", "{file}"], {}, "--out {file}: exists and is not a directory"),
        (["--out", "{file}/models"], {}, "--out {file}/models: cannot create the directory"),
        (["--out", "{tmp}/models", "--report", "{file}"], {}, "--report {file}: exists and is not a directory"),
        (["--out", "{tmp}/models"], {"TAGSTREAM_SIGNING_KEY_PATH": "/nonexistent"}, "TAGSTREAM_SIGNING_KEY_PATH"),
        (["--out", "{tmp}/models", "--every", "1s"], {"TAGSTREAM_SIGNING_KEY_PATH": "/nonexistent"}, "/nonexistent"),
        (["--out", "{tmp}/models"], {"TAGSTREAM_HIDDEN": "[a]"}, "TAGSTREAM_HIDDEN does not parse"),
        (["--out", "{tmp}/models", "--every", ""], {}, "bad duration ''"),  # before: a single run
        (["--out", "{tmp}/models", "--every", "200000d"], {}, "at most 366d"),  # before: OverflowError at the sleep
        # before: found out after each cycle's whole training
        (["--out", "{tmp}/models", "--every", "1s"], {"TAGSTREAM_TOPIC_PREFIX": NO_TOPICS}, "does not exist at"),
        (["--out", "{tmp}/models", "--every", "1s"], {"TAGSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, "could not reach"),
        # before: found out once the catalog was read, without the variables' names (with --every: every cycle)
        (["--out", "{tmp}/models"], NGRAMS_5_3, "TAGSTREAM_CHAR_NGRAM_MIN=5 is more than TAGSTREAM_CHAR_NGRAM_MAX=3"),
        (
            ["--out", "{tmp}/models", "--every", "1s"],
            {**NGRAMS_5_3, "TAGSTREAM_TOPIC_PREFIX": NO_TOPICS},
            "NGRAM_MIN=5",
        ),
    ],
)
def test_train_reports_a_bad_output_path_key_or_setting_in_one_line_before_training(
    tiny_catalog: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    args: list[str],
    env: dict[str, str],
    expected: str,
) -> None:
    from tagstream.cli import main

    caplog.set_level(logging.INFO)
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = [a.format(file=afile, tmp=tmp_path) for a in args]
    code = main(["train", "--catalog", str(tiny_catalog), "--format", "jsonl", *argv, "--cycles", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("tagstream train: error: ") and expected.format(file=afile) in err[-1], err[-3:]
    assert not any("loaded" in r.getMessage() for r in caplog.records)  # refused before reading the catalog
    assert not list(tmp_path.glob("models/2*"))  # and before training: no bundle


@pytest.mark.parametrize(
    ("flag", "inside"), [("--out", ""), ("--out", "/models"), ("--report", ""), ("--report", "/reports")]
)
def test_train_refuses_to_write_into_an_existing_bundle(
    tiny_catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, inside: str
) -> None:
    from serving.bundle import load_bundle
    from tagstream.cli import main
    from tests.tinymodel import make_bundle

    bundle = make_bundle(tmp_path / "registry")
    out = ["--out", str(tmp_path / "registry")] if flag == "--report" else []
    argv = ["train", "--catalog", str(tiny_catalog), "--format", "jsonl", *out, flag, f"{bundle}{inside}"]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    # before: the new bundle (or its report) was written inside the old one, which then no longer validated
    assert code == 2 and err[-1].startswith(f"tagstream train: error: {flag} {bundle}{inside}: "), err[-3:]
    assert f"the model bundle {bundle}, which nothing may be written into" in err[-1]
    assert {p.name for p in bundle.iterdir()} == {*load_bundle(bundle).manifest["files"], "manifest.json"}


def test_a_directory_that_only_looks_like_a_bundle_or_a_symlink_loop_gets_the_usual_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.settings import writable_dir

    app = tmp_path / "app"  # a web app's manifest.json beside an ONNX file: was "lies inside the model bundle"
    app.mkdir()
    (app / "manifest.json").write_text("{}")
    (app / "model.onnx").write_bytes(b"onnx")
    assert writable_dir(app / "models", "--out") == app / "models" and (app / "models").is_dir()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # was a RuntimeError traceback from Path.resolve()
    with pytest.raises(ConfigError, match=r"--out .*loop"):
        writable_dir(loop / "models", "--out")


@pytest.mark.parametrize(
    ("env", "flag", "expected"),
    [
        ({}, [], True),
        ({"TAGSTREAM_BASELINE": "false"}, [], False),
        ({"TAGSTREAM_BASELINE": "true"}, ["--no-baseline"], False),
    ],
)
def test_train_takes_the_baseline_setting_from_the_environment_unless_the_flag_is_given(
    tiny_catalog: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    flag: list[str],
    expected: bool,
) -> None:
    import training.train
    from tagstream.cli import main
    from tagstream.errors import ConfigError

    seen: list[bool] = []

    def train(products, settings, **kwargs):
        seen.append(settings.baseline)
        raise ConfigError("stop here: only the settings matter")

    monkeypatch.setattr(training.train, "train", train)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = ["train", "--catalog", str(tiny_catalog), "--format", "jsonl", "--out", str(tmp_path / "models"), *flag]
    assert main(argv) == 2
    assert seen == [expected]  # before: TAGSTREAM_BASELINE=false trained the baseline all the same


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_missing_catalog_is_named_without_a_line_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from tagstream.cli import main

    missing = tmp_path / "nope.jsonl"
    args = ["--out", str(tmp_path / "models")] if command == "train" else ["--model", str(tmp_path)]
    assert main([command, "--catalog", str(missing), "--format", "jsonl", *args]) == 2
    # before: "nope.jsonl: line 0: file not found"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tagstream {command}: error: no such file: {missing}"


@pytest.fixture
def model_updates_topic() -> Iterator[str]:
    """A fresh topic prefix whose `<prefix>model-updates` exists on the local stack's broker (deleted after)."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    prefix = f"fixtrain-{uuid.uuid4().hex[:8]}-"

    async def admin(create: bool) -> None:
        client = AIOKafkaAdminClient(bootstrap_servers="127.0.0.1:9092")
        await client.start()
        try:
            if create:
                await client.create_topics([NewTopic(f"{prefix}model-updates", 1, 1)])
            else:
                await client.delete_topics([f"{prefix}model-updates"])
        finally:
            await client.close()

    asyncio.run(admin(True))
    try:
        yield prefix
    finally:
        asyncio.run(admin(False))


def _next_line(proc: subprocess.Popen[str], deadline_s: float = 300.0) -> str:
    """The next stdout line of `proc` (bounded polling; '' when the process ends or the deadline passes)."""
    import select
    import time

    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            return proc.stdout.readline()  # type: ignore[union-attr]
    return ""


def test_every_prints_each_cycle_as_it_ends_writes_its_report_and_keeps_the_gate_across_a_restart(
    tmp_path: Path, model_updates_topic: str
) -> None:
    import signal

    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(generate_catalog(200, seed=5), catalog)
    out, reports = tmp_path / "models", tmp_path / "reports"
    env = {**os.environ, **TINY_ENV, "TAGSTREAM_EPOCHS": "1", "TAGSTREAM_TOPIC_PREFIX": model_updates_topic}
    cmd = [sys.executable, "-m", "tagstream.cli", "train", "--catalog", str(catalog), "--format", "jsonl"]
    cmd += ["--out", str(out), "--no-baseline", "--report", str(reports), "--every"]
    with (tmp_path / "every.err").open("w") as err:
        proc = subprocess.Popen([*cmd, "1h"], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            line = _next_line(proc)  # before: nothing on stdout until the loop ended (never, with a real --every)
        finally:
            proc.send_signal(signal.SIGTERM)  # `docker stop` during the sleep
            code = proc.wait(timeout=120)
    stderr = (tmp_path / "every.err").read_text()
    first = json.loads(line)
    assert first["cycle"] == 1 and first["publish"] is True, (line, stderr[-2000:])
    bundle = Path(first["bundle"])
    from training.loaders import load_catalog
    from training.train import products_sha256

    manifest = json.loads((bundle / "manifest.json").read_text())  # SPEC §2: the cleaned products' canonical JSONL
    assert manifest["training_data_sha256"] == products_sha256(load_catalog(catalog, "jsonl").products)
    # before: no report at all with --every, and --report was ignored
    assert first["report"] == str(reports / bundle.name / "report.html") and Path(first["report"]).is_file()
    assert code == 143 and "Traceback" not in stderr and "terminated (SIGTERM)" in stderr
    # restarted: the first model is compared with the one published before the restart (before: "no current model")
    again = subprocess.run([*cmd, "1h", "--cycles", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout)
    assert second["current"] == str(bundle) and second["reasons"] != ["no current model"], second
    assert (reports / Path(second["bundle"]).name / "report.html").is_file()


def test_sigterm_while_every_reads_model_updates_exits_143_with_one_line(
    tiny_catalog: Path,
    tmp_path: Path,
    model_updates_topic: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import signal

    import aiokafka

    import training.train
    from tagstream.cli import main
    from tests.tinymodel import make_bundle

    stopped: list[bool] = []
    start, stop = aiokafka.AIOKafkaConsumer.start, aiokafka.AIOKafkaConsumer.stop

    async def start_then_sigterm(self, *args, **kwargs):
        await start(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # `docker stop` while the cycle reads model-updates

    async def stop_and_note(self, *args, **kwargs):
        await stop(self, *args, **kwargs)
        stopped.append(True)

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "start", start_then_sigterm)
    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "stop", stop_and_note)
    monkeypatch.setattr(training.train, "train", lambda products, settings, *, registry, split: make_bundle(registry))
    monkeypatch.setattr(training.train, "evaluate_bundle", lambda bundle, products: {"groups": {}})
    monkeypatch.setenv("TAGSTREAM_TOPIC_PREFIX", model_updates_topic)
    argv = ["train", "--catalog", str(tiny_catalog), "--format", "jsonl", "--out", str(tmp_path / "models")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--every", "1h", "--cycles", "1"])
    err = capsys.readouterr().err
    # before: asyncio.CancelledError out of the consumer's stop, a traceback and exit 1
    assert exit_info.value.code == 143
    assert err.strip().splitlines()[-1] == "tagstream train: terminated (SIGTERM)" and "Traceback" not in err
    assert stopped == [True]  # the consumer was stopped cleanly inside the loop
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize(
    ("signame", "code", "said"), [("SIGTERM", 143, "terminated (SIGTERM)"), ("SIGINT", 130, "interrupted (Ctrl-C)")]
)
def test_a_stop_while_the_bundle_is_written_leaves_no_temp_directory_and_says_so(
    tmp_path: Path, signame: str, code: int, said: str
) -> None:
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(generate_catalog(200, seed=5), catalog)
    out = tmp_path / "models"
    hook = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal, even if the runner ignores it
        "import serving.bundle\n"
        "write = serving.bundle.write_bundle\n"
        "def mid_write(registry, **kw):\n"
        "    save = kw['featurizer_files']\n"
        "    def save_then_sigterm(directory):\n"
        "        names = save(directory)\n"
        f"        os.kill(os.getpid(), signal.{signame})  # `docker stop` or Ctrl-C with the bundle half written\n"
        "        return names\n"
        "    return write(registry, **{**kw, 'featurizer_files': save_then_sigterm})\n"
        "serving.bundle.write_bundle = mid_write\n"
        "from tagstream.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["train", "--catalog", str(catalog), "--format", "jsonl", "--out", str(out), "--no-baseline"]
    run = subprocess.run(
        [sys.executable, "-c", hook, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **TINY_ENV, "TAGSTREAM_EPOCHS": "1"},
    )
    # before: SIGTERM killed it (-15) with a hidden .tmp-* directory left in the registry for good; Ctrl-C exited 130
    # without a word
    assert run.returncode == code, run.stderr[-3000:]
    assert list(out.iterdir()) == [] and f"tagstream train: {said}" in run.stderr and "Traceback" not in run.stderr


def test_demo_refuses_zero_rate_and_zero_epochs_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import tagstream.stack
    from tagstream.cli import main

    def no_stack(*a: object, **k: object) -> None:
        raise AssertionError("the demo started the stack before checking its arguments")

    monkeypatch.setattr(tagstream.stack, "stack_up", no_stack)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--rate", "0", "--workdir", str(tmp_path / "d")])
    assert exit_info.value.code == 2
    assert "argument --rate: must be > 0" in capsys.readouterr().err
    assert main(["demo", "--epochs", "0", "--workdir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tagstream demo: error: invalid trainer settings: epochs:"), err[-3:]
