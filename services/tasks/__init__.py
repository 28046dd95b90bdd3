"""The task registry: one handler per task, each in its own module of this package.

Adding a task is a module here that defines a ``TaskHandler`` subclass as ``TASK`` (its native
routes, preprocessing read from the contract, value checks, postprocessing, OpenAPI pieces) and one
line in ``TASK_MODULES``. The front-ends, the data plane and the repository know tasks only through
this registry. Modules are imported on first use: importing the registry does no work."""

from __future__ import annotations

import functools
import importlib

from services.tasks.base import TaskHandler

TASK_MODULES = (
    "services.tasks.classify",
    "services.tasks.segment",
    "services.tasks.generate",
    "services.tasks.denoise",
    "services.tasks.sample",
    "services.tasks.image_to_image",
    "services.tasks.tensor",
)


@functools.cache
def task_classes() -> dict[str, type[TaskHandler]]:
    """Task name (what a contract's ``task`` says) -> its handler class, in registration order."""
    classes: dict[str, type[TaskHandler]] = {}
    for module in TASK_MODULES:
        handler = importlib.import_module(module).TASK
        if handler.name in classes:
            raise ValueError(f"{module}: task {handler.name!r} is registered twice")
        classes[handler.name] = handler
    return classes


def task_class(task: str) -> type[TaskHandler] | None:
    return task_classes().get(task)


def default_models() -> tuple[str, ...]:
    """The model each task's native routes use by default (served whether or not the store has it
    yet, so readiness says what is missing)."""
    return tuple(c.default_model for c in task_classes().values() if c.default_model)


def runners_for(config, observer_for):
    """The repository's hook: a loaded version's (batcher, task scheduler), built by its task."""

    def build(stored, session):
        handler = task_class(session.contract.task) or TaskHandler
        return handler.runners(stored, session, config, observer_for(stored.name))

    return build
