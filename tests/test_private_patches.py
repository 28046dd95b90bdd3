"""Every use of a dependency's private code is guarded here: a test that fails as soon as the
dependency changes under it (its version, or the sha256 of the source we patch, wrap or call), with
a message saying what to re-check, plus a check of the behaviour we rely on. And no new private
use comes in unguarded: the import scan below lists the allowed ones.

    BentoML TimeoutMiddleware.__call__   replaced (services/bentoml_fixes.py)
    BentoML ModelStore                   a second store root (services/repository.py, model_dir)
    uvicorn HTTP protocols               wrapped (services/frontends/connections.py)"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("contract", "common", "services", "training", "export", "loadtest")
# Private modules of dependencies our code may import, each guarded below.
ALLOWED_PRIVATE = {"bentoml._internal.server.http.traffic": "test_bentoml_timeout_fix_is_checked_against_this_bentoml",
                   "bentoml._internal.models.model": "test_bentoml_model_store_is_checked_against_this_bentoml"}


def sha256_of(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


def recheck(what: str, where: str) -> str:
    return (f"{what} changed under us: re-check the patch in {where} against the new source, then record the "
            f"new version and sha256 there (or drop the patch if upstream fixed it)")


def test_no_unguarded_private_import():
    """An import of a dependency's private module (a dotted part starting with one underscore)
    anywhere in our packages, at any depth, is one of ALLOWED_PRIVATE, each guarded by a test here."""
    found = set()
    for package in OURS:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [f"{node.module}.{alias.name}" for alias in node.names]  # module or name in it
                for name in names:
                    parts = name.split(".")
                    if parts[0] not in OURS and any(p.startswith("_") and not p.startswith("__") for p in parts):
                        private = ".".join(parts[:next(i for i, p in enumerate(parts) if p.startswith("_")) + 1])
                        if not any(name.startswith(allowed) for allowed in ALLOWED_PRIVATE):
                            found.add(f"{path.relative_to(REPO)}:{node.lineno} imports {private}")
    assert not found, ("private modules of dependencies, unguarded: use a public API, or add a guard test to "
                       "tests/test_private_patches.py and the module to ALLOWED_PRIVATE\n" + "\n".join(sorted(found)))
    for test in ALLOWED_PRIVATE.values():
        assert callable(globals().get(test)), test


# ---- BentoML's TimeoutMiddleware (services/bentoml_fixes.py) ---------------------------------------

def test_bentoml_timeout_fix_is_checked_against_this_bentoml():
    import bentoml

    from services import bentoml_fixes

    where = "services/bentoml_fixes.py"
    assert bentoml.__version__ == bentoml_fixes.PATCHED_VERSION, recheck(f"BentoML ({bentoml.__version__})", where)
    middleware = bentoml_fixes.timeout_middleware()
    for name in ("__init__", "_set_timer_out", "__call__"):
        assert callable(getattr(middleware, name, None)), recheck(f"TimeoutMiddleware.{name}", where)
    assert sha256_of(middleware) == bentoml_fixes.PATCHED_SOURCE_SHA256, recheck("TimeoutMiddleware's source", where)
    assert bentoml_fixes.source_sha256(middleware) == bentoml_fixes.PATCHED_SOURCE_SHA256


def one_request(call, timeout: float, app_delay: float = 0.0) -> tuple[list, list]:
    """One HTTP request through ``call`` (a TimeoutMiddleware.__call__) -> (the timeout timers it
    scheduled, the ASGI messages sent back)."""
    from services import bentoml_fixes

    async def main():
        loop = asyncio.get_running_loop()
        timers, sent = [], []
        schedule = loop.call_later

        def call_later(delay, callback, *args, **kwargs):
            handle = schedule(delay, callback, *args, **kwargs)
            if getattr(callback, "__name__", "") == "_set_timer_out":
                timers.append(handle)
            return handle

        loop.call_later = call_later

        async def app(scope, receive, send):
            await asyncio.sleep(app_delay)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/", "query_string": b"", "headers": []}
        await call(bentoml_fixes.timeout_middleware()(app, timeout), scope, receive, send)
        return timers, sent

    return asyncio.run(main())


def test_bentoml_timeout_fix_cancels_the_request_timer(monkeypatch):
    from services import bentoml_fixes

    middleware = bentoml_fixes.timeout_middleware()
    original = bentoml_fixes.original_call(middleware)
    monkeypatch.setattr(middleware, "__call__", original)  # BentoML's own, restored after the test

    timers, sent = one_request(original, timeout=60.0)
    assert sent[0]["status"] == 200 and len(timers) == 1
    assert not timers[0].cancelled(), ("BentoML's TimeoutMiddleware now cancels its timer itself: drop "
                                       "services/bentoml_fixes.py and its call in services/service.py")

    assert bentoml_fixes.cancel_request_timers()
    timers, sent = one_request(middleware.__call__, timeout=60.0)
    assert sent[0]["status"] == 200 and len(timers) == 1 and timers[0].cancelled()
    timers, sent = one_request(middleware.__call__, timeout=0.05, app_delay=1.0)  # still times out: 504
    assert sent[0]["status"] == 504 and json.loads(sent[1]["body"])["error"].startswith("Not able to process")


# ---- BentoML's ModelStore (services/repository.py) -------------------------------------------------

def test_bentoml_model_store_is_checked_against_this_bentoml():
    import bentoml
    from bentoml._internal.models.model import ModelStore
    from bentoml._internal.store import Store

    from services import repository

    where = "services/repository.py (BentoModelStore)"
    assert bentoml.__version__ == repository.BENTOML_STORE_WRITTEN_FOR, recheck(f"BentoML ({bentoml.__version__})", where)
    for cls in (ModelStore, Store):
        name = f"{cls.__module__}.{cls.__qualname__}"
        assert sha256_of(cls) == repository.BENTOML_STORE_SHA256[name], recheck(name, where)


def test_a_model_folder_is_read_as_bentoml_reads_its_store(tmp_path):
    """A model saved with BentoML's public API, in a fresh store: the private class, given the
    store's models folder as another root, finds the same versions with the same metadata."""
    script = """
import json, sys
from pathlib import Path
import bentoml
from services.repository import BentoModelStore
with bentoml.models.create("guard-model", metadata={"task": "image-classification"}) as model:
    Path(model.path_of("model.onnx")).write_bytes(b"x")
ours = BentoModelStore(Path(sys.argv[1]) / "models")
theirs = BentoModelStore()
print(json.dumps([[(v.name, v.version, str(v.folder), v.metadata) for v in store.list_versions("guard-model")]
                  + [store.list_names(["image-classification"])] for store in (ours, theirs)]))
"""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert ours == theirs and ours[-1] == ["guard-model"] and len(ours) == 2, (ours, theirs)


# ---- uvicorn's HTTP protocols (services/frontends/connections.py) ----------------------------------

def test_the_http_guard_is_checked_against_this_uvicorn():
    import uvicorn

    from services.frontends import connections

    where = "services/frontends/connections.py"
    assert uvicorn.__version__ == connections.WRITTEN_FOR, recheck(f"uvicorn ({uvicorn.__version__})", where)
    for dotted, digest in connections.WRITTEN_FOR_SHA256.items():
        module, _, name = dotted.rpartition(".")
        assert sha256_of(getattr(importlib.import_module(module), name)) == digest, recheck(dotted, where)


# ---- Starlette's route path (services/frontends/asgi.py) -------------------------------------------

@pytest.mark.parametrize("path, root, expected", [
    ("/classify", "", "/classify"),
    ("/api/classify", "/api", "/classify"),
    ("/api", "/api", ""),
    ("/api/", "/api", "/"),
    ("/apiary", "/api", "/apiary"),  # a prefix that does not end at a segment is not the mount
    ("/other", "/api", "/other"),
])
def test_route_path_strips_the_mount_as_starlette_does(path, root, expected):
    """Our own few lines instead of Starlette's private ``starlette._utils.get_route_path`` (Starlette
    is unpinned); where Starlette still has it, both agree."""
    from services.frontends.asgi import route_path

    scope = {"type": "http", "path": path, "root_path": root} if root else {"type": "http", "path": path}
    assert route_path(scope) == expected
    try:
        from starlette._utils import get_route_path
    except ImportError:
        return
    assert get_route_path(scope) == expected
