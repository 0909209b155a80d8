"""`train` and `demo` refused on their input (a catalog that does not load, a bad setting or key) say so in one line
and leave no output directory behind; a whole-file catalog error names no line ("line 0"), and the demo checks its
catalog before it starts the stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from tagstream.cli import main


def _only_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tagstream {command}: error: "), err
    return err[0].removeprefix(f"tagstream {command}: error: ")


@pytest.fixture
def no_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo may not reach the stack in these tests."""
    import tagstream.stack

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the demo started the stack before checking its catalog")

    monkeypatch.setattr(tagstream.stack, "stack_up", refuse)


@pytest.fixture
def jsonl_of_one(tmp_path: Path) -> Path:
    catalog = tmp_path / "one.jsonl"
    catalog.write_text('{"product_id": "p1", "title": "red cotton shirt", "category_path": ["Apparel", "Shirts"]}\n')
    return catalog


@pytest.mark.parametrize(
    ("extra", "env", "expected"),
    [
        ([], {}, "/etc/hostname: line 1: invalid_json"),
        (["--report", "{tmp}/report"], {}, "/etc/hostname: line 1: invalid_json"),
        ([], {"TAGSTREAM_SIGNING_KEY_PATH": "{tmp}/no-key.pem"}, "no-key.pem"),  # before: the registry was made
    ],
)
def test_train_refused_on_its_input_leaves_no_registry_or_report_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    env: dict[str, str],
    expected: str,
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(tmp=tmp_path))
    out = tmp_path / "reg0"
    argv = ["train", "--catalog", "/etc/hostname", "--format", "jsonl", "--out", str(out)]
    assert main([*argv, *(a.format(tmp=tmp_path) for a in extra)]) == 2
    assert expected in _only_error(capsys, "train")
    assert not out.exists() and not (tmp_path / "report").exists()  # before: empty directories were left


def test_train_without_out_leaves_no_models_directory_in_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TAGSTREAM_MODEL_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--catalog", "/etc/hostname", "--format", "jsonl"]) == 2
    assert "line 1: invalid_json" in _only_error(capsys, "train")
    assert list(tmp_path.iterdir()) == []  # before: an empty ./models (the default registry)


def test_train_still_refuses_a_bad_out_before_reading_the_catalog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", "--catalog", "/etc/hostname", "--format", "jsonl", "--out", f"{afile}/models"]) == 2
    assert _only_error(capsys, "train").startswith(f"--out {afile}/models: cannot create the directory")


@pytest.mark.usefixtures("no_stack")
@pytest.mark.parametrize(
    ("catalog", "fmt", "expected"),
    [
        ("/etc/hostname", "myntra", "/etc/hostname: line 1: header"),
        ("/nonexistent", "myntra", "no such file: /nonexistent"),  # before: "/nonexistent: line 0: file not found"
        ("{one}", "jsonl", "the catalog has 1 products; the demo needs at least 50"),
        ("{tmp}", "jsonl", "is a directory, not a catalog file"),
    ],
)
def test_demo_refused_on_its_catalog_says_why_before_the_stack_and_leaves_no_workdir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], jsonl_of_one: Path, catalog: str, fmt: str, expected: str
) -> None:
    work = tmp_path / "dbad2"
    path = catalog.format(one=jsonl_of_one, tmp=tmp_path)
    assert main(["demo", "--catalog", path, "--format", fmt, "--workdir", str(work), "--no-live"]) == 2
    error = _only_error(capsys, "demo")
    assert expected in error and "line 0" not in error
    assert not work.exists()  # before: an empty workdir was left


@pytest.mark.usefixtures("no_stack")
def test_demo_with_a_bad_setting_leaves_no_workdir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "d"
    assert main(["demo", "--epochs", "0", "--workdir", str(work), "--no-live"]) == 2
    assert "epochs" in _only_error(capsys, "demo")
    assert not work.exists()
