"""`tagstream lookup` serves a product's current tags and behaviour features from the real Redis state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.events import behaviour, upsert
from tests.integration.conftest import REPO, StreamEnv
from tests.models import featurized_bundle

pytestmark = pytest.mark.integration
T0 = 1_764_316_800_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_lookup_serves_current_tags_and_features(stream_env: StreamEnv, tmp_path: Path) -> None:
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(featurized_bundle(tmp_path / "reg")))
    stream_env.produce("products", [upsert("lk-1", "Levis Men Black Jeans", attributes={"size": "32"})])
    views = [behaviour("lk-1", f"u{i % 6}", T0 + i * 1000, "view") for i in range(20)]
    clicks = [behaviour("lk-1", f"u{i}", T0 + 30_000 + i, "click") for i in range(5)]
    stream_env.produce("behavior", [*views, *clicks, behaviour("lk-1", "u1", T0 + 40_000, "purchase")])
    updates = stream_env.consume("tag-updates", lambda m: any(u["product_id"] == "lk-1" for u in m))

    port = _free_port()
    env = {**os.environ, **stream_env.env}
    server = subprocess.Popen([sys.executable, "-m", "tagstream.cli", "lookup", "--port", str(port)], env=env, cwd=REPO)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                status, health = _get(f"{base}/healthz")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail("lookup server did not start")
                time.sleep(0.2)
        assert status == 200 and health["status"] == "ok"

        # The features reflect every event once the worker has applied them.
        deadline = time.monotonic() + 30
        while True:
            status, features = _get(f"{base}/products/lk-1/features")
            if (status == 200 and features["windows"]["h1"]["purchases"] == 1) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        h1 = features["windows"]["h1"]
        assert (h1["views"], h1["clicks"], h1["purchases"]) == (20, 5, 1)
        assert h1["ctr"] == pytest.approx(5 / 20) and h1["conversion"] == pytest.approx(1 / 20)
        assert h1["unique_users"] == 6  # u0..u5 (HyperLogLog is exact at this size)

        status, tags = _get(f"{base}/products/lk-1/tags")
        assert status == 200 and tags["product_id"] == "lk-1"
        assert "size:32" in {t["tag"] for t in tags["tags"]}
        first = next(u for u in updates if u["product_id"] == "lk-1")
        assert {t["tag"] for t in first["tags"] if t["origin"] != "behaviour"} <= {t["tag"] for t in tags["tags"]}

        assert _get(f"{base}/products/nobody/tags")[0] == 404
        assert _get(f"{base}/products/nobody/features")[0] == 404
    finally:
        server.terminate()
        server.wait(timeout=10)
