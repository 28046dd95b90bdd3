"""Open Inference Protocol v2 (KServe v2 / Triton protocol) front-ends for ``Suite``.

* ``rest``: a Starlette app mounted by ``Suite`` at ``/v2`` on the BentoML HTTP port (JSON tensors and
  the binary tensor data extension).
* ``grpc_server``: ``inference.GRPCInferenceService`` on its own port (9000, env ``SUITE_GRPC_PORT``),
  started and stopped by ``Suite``'s lifecycle hooks.
* ``core``: what both share: metadata read from the hub's contracts, tensor codecs, and inference
  through ``Suite.infer`` (so batching and sessions are shared with the native APIs) or, for the
  ``generate`` model's ``text_input``, through ``Suite.text``.

Serving needs ``tritonclient[grpc]`` for the generated gRPC modules (see ``grpc_server``).
"""
