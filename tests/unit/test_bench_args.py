"""`tagstream bench` refuses a bad `--runs` or `--only` while parsing: one error line, exit 2, nothing trained."""

from __future__ import annotations

import pytest

import tagstream.bench
from tagstream.cli import build_parser, main


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any start of the bench (training the model, measuring) fail the test."""

    def no_bench(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bench started before its arguments were checked")

    monkeypatch.setattr(tagstream.bench, "run_bench", no_bench)
    monkeypatch.setattr(tagstream.bench, "_train_model", no_bench)


@pytest.mark.usefixtures("nothing_runs")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runs", "0"], "argument --runs: must be ≥ 1, got 0"),
        (["--runs", "-3"], "argument --runs: must be ≥ 1, got -3"),
        (["--runs", "two"], "argument --runs: not an integer: 'two'"),
        (
            ["--only", "bogus"],
            "argument --only: unknown section 'bogus'; the sections are stream,naive,scoring,featurizer",
        ),
        (["--only", "stream,bogus,zz"], "argument --only: unknown sections 'bogus', 'zz'; the sections are "),
        (["--only", ","], "argument --only: no section named; the sections are "),
    ],
)
def test_bench_refuses_bad_runs_and_sections_when_parsing(
    capsys: pytest.CaptureFixture[str], tmp_path: object, argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse exits 2 after its usage and one error line
        main(["bench", *argv, "--out", f"{tmp_path}/bench"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"tagstream bench: error: {message}")


def test_bench_takes_good_runs_and_sections() -> None:
    args = build_parser().parse_args(["bench", "--runs", "1", "--only", "stream, featurizer"])
    assert args.runs == 1 and args.only == {"stream", "featurizer"}
    assert build_parser().parse_args(["bench"]).only is None
