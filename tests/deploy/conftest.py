"""Fixtures over the deployment files (readers in tests/deploy/readers.py)."""

from __future__ import annotations

import re

import pytest

from tests.deploy.readers import DEPLOY, ROOT, Block, load_compose, parse_nginx


@pytest.fixture(scope="session")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="session")
def nginx() -> Block:
    return parse_nginx((DEPLOY / "nginx.conf").read_text())


@pytest.fixture(scope="session")
def dockerfile_stages() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"FROM \S+ AS (\w+)\n(.*?)(?=\nFROM |\Z)", text, flags=re.S))
