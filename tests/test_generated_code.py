"""Committed generated code must match its sources: the gRPC stubs and the migrations."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "proto" / "citytwin" / "v1"
APPS = ("twin", "provisioning")  # packages with tortoise models and migrations


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "citytwin" / "v1"
    generated = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed = sorted(p.name for p in API_DIR.iterdir() if "_pb2" in p.name)
    assert generated == committed, "run `make proto`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, API_DIR, generated, shallow=False)
    assert not mismatch and not errors, (
        f"stale generated code {mismatch + errors}: run `make proto`"
    )


def test_migrations_match_models(tmp_path: Path) -> None:
    # makemigrations writes into the package it finds, so run it on a copy of the tree.
    copy = tmp_path / "tree"
    for package in APPS:
        shutil.copytree(
            ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tortoise",
            "-c",
            "twin.database.MIGRATIONS_CONFIG",
            "makemigrations",
        ],
        cwd=copy,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    created = sorted(str(p.relative_to(copy)) for p in copy.glob("*/migrations/0*.py"))
    committed = sorted(
        f"{a}/migrations/{p.name}" for a in APPS for p in (ROOT / a / "migrations").glob("0*.py")
    )
    assert created == committed, (
        "models changed without a migration: run `make migrations` and commit the result\n"
        + result.stdout
    )
