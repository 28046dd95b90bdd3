"""Cancel on disconnect, without a server: a route that runs long (text generation, native-size
images) cancels its handler when the client leaves before the answer; a route serving fast models
runs its handler without the watcher, whose two tasks per request cost throughput. Driven through
the ASGI interface with a client that leaves once its body is sent, so no timing decides the result."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.rollout import Rollouts
from services.frontends.asgi import HttpFrontend, Request, json_response


class Plane:
    """What the endpoint asks the data plane: admission, whether a model runs long, rollouts."""

    rollouts = Rollouts([])

    def admission_error(self, model):
        return None

    def runs_long(self, model):
        return model == "slow"


def frontend_with(handler, cancel_on_disconnect):
    app = HttpFrontend()
    app.route("/v2/models/{model}/infer", handler, ("POST",), "oip_rest", ":model", admits=True,
              cancel_on_disconnect=cancel_on_disconnect)
    app.bind(Plane())
    return app


async def call(app, path: str, client_leaves: bool) -> list[dict]:
    """One POST; the client's receive channel gives the body, then (if it leaves) a disconnect."""
    messages = [{"type": "http.request", "body": json.dumps({"x": 1}).encode(), "more_body": False}]
    if client_leaves:
        messages.append({"type": "http.disconnect"})
    never = asyncio.Event()

    async def receive():
        if messages:
            return messages.pop(0)
        await never.wait()  # a client still waiting for its answer

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")]}
    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


def test_a_long_request_is_cancelled_when_its_client_leaves():
    state = {"started": False, "cancelled": False}

    async def generate(request: Request):
        await request.body()
        state["started"] = True
        try:
            await asyncio.sleep(60)  # a generation nobody will read
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        return json_response({"text": "never"})

    app = frontend_with(generate, lambda plane, model: plane.runs_long(model))
    sent = asyncio.run(call(app, "/v2/models/slow/infer", client_leaves=True))
    assert state == {"started": True, "cancelled": True}
    assert sent == []  # nothing is answered to a client that has gone


@pytest.mark.parametrize("cancel", [True, lambda plane, model: plane.runs_long(model)], ids=["always", "predicate"])
def test_a_request_whose_client_stays_is_answered(cancel):
    async def answer(request: Request):
        return json_response(await request.json())

    sent = asyncio.run(call(frontend_with(answer, cancel), "/v2/models/slow/infer", client_leaves=False))
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"x": 1}


def test_a_fast_model_runs_without_the_watcher():
    """The handler runs in the endpoint's own task: no watcher task calls receive() beside it."""
    tasks = []

    async def answer(request: Request):
        tasks.append(len(asyncio.all_tasks()))
        return json_response(await request.json())

    async def main():
        app = frontend_with(answer, lambda plane, model: plane.runs_long(model))
        sent = await call(app, "/v2/models/fast/infer", client_leaves=False)
        await call(app, "/v2/models/slow/infer", client_leaves=False)
        return sent

    sent = asyncio.run(main())
    assert sent[0]["status"] == 200
    assert tasks[0] + 2 == tasks[1]  # the slow model's request: its handler and watcher tasks


def test_which_tasks_run_long():
    from services.tasks import task_classes

    long = {task for task, handler in task_classes().items() if handler.runs_long}
    assert {"text-generation", "image-denoising"} <= long  # seconds per request: cancelled when the client leaves
    assert not long & {"image-classification", "semantic-segmentation", "image-generation", "tensor"}  # fast ones
