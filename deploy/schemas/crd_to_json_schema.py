"""A CustomResourceDefinition's openAPIV3Schema as a strict JSON schema (the way the API server
treats unknown fields of a structural schema: rejected), for validating manifests offline.

    python deploy/schemas/crd_to_json_schema.py keda.sh_scaledobjects.yaml v1alpha1 > keda-scaledobject-v1alpha1.json

kubernetes-validate carries only Kubernetes' own kinds; tests/test_deploy_manifests.py validates a
custom resource against the file this writes, with jsonschema."""

from __future__ import annotations

import json
import sys

import yaml


def strict(schema: dict) -> dict:
    """Every object schema that lists its properties refuses others (unless it says otherwise or
    preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def main(crd_file: str, version: str) -> None:
    crd = yaml.safe_load(open(crd_file))
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(found["schema"]["openAPIV3Schema"])
    schema["$comment"] = f"{crd['metadata']['name']} {version}, from {crd_file} (strict: unknown fields refused)"
    json.dump(schema, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
