#!/usr/bin/env python3
"""Validates the Prometheus Operator objects of rendered manifests.

    validate-monitors.py FILE...      validate every PodMonitor/ServiceMonitor
    validate-monitors.py --self-test  show that a misspelled field fails

kubernetes-validate knows only the Kubernetes API's own kinds: it merely
warns about a PodMonitor or a ServiceMonitor. Their schema comes from the
prometheus-operator CRDs, as generated into the models of the PyPI package
`cloudcoil-models-prometheus-operator` (version pinned by validate.sh).
The models accept unknown fields; here every object schema that lists its
properties is made strict (`additionalProperties: false`), as
kubernetes-validate's --strict does for the built-in kinds, so a
misspelled field is an error.

weir's own rule on top: every scrape endpoint has `honorLabels: true`
(weir's series carry the meshed pod's `namespace` and `pod` labels, which
the operator would otherwise rename to exported_namespace / exported_pod).
"""

import sys

import jsonschema
import yaml
from cloudcoil.models.prometheus_operator import v1

KINDS = {
    "PodMonitor": (v1.PodMonitor, "podMetricsEndpoints"),
    "ServiceMonitor": (v1.ServiceMonitor, "endpoints"),
}


def strict(node):
    """Forbids properties a schema object does not list, everywhere."""
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)
    return node


def validator(kind):
    model = KINDS[kind][0]
    schema = strict(model.model_json_schema(by_alias=True, mode="validation"))
    # The object must say what it is (the models default these).
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return jsonschema.Draft202012Validator(schema)


def check(doc, where):
    """The errors of one object, as printable lines."""
    kind = doc.get("kind")
    errors = []
    for e in validator(kind).iter_errors(doc):
        # anyOf (a field or null) hides the reason: take the deepest.
        while e.context:
            e = max(e.context, key=lambda c: (len(c.absolute_path), c.validator != "type"))
        path = ".".join(str(p) for p in e.absolute_path) or "(top)"
        errors.append(f"{where}: {kind} {doc.get('metadata', {}).get('name')}: {path}: {e.message}")
    endpoints = (doc.get("spec") or {}).get(KINDS[kind][1]) or []
    if not endpoints:
        errors.append(f"{where}: {kind}: no {KINDS[kind][1]}")
    for i, ep in enumerate(endpoints):
        if not isinstance(ep, dict) or ep.get("honorLabels") is not True:
            errors.append(
                f"{where}: {kind}: spec.{KINDS[kind][1]}.{i}: honorLabels must be true "
                "(weir's namespace/pod labels would be renamed exported_namespace/exported_pod)"
            )
    return errors


def self_test():
    good = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "weir", "namespace": "weir-system"},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "weir"}},
            "podMetricsEndpoints": [{"port": "metrics", "honorLabels": True}],
        },
    }
    assert check(good, "self-test") == [], check(good, "self-test")
    typo = yaml.safe_load(yaml.safe_dump(good))
    typo["spec"]["podMetricsEndpoints"][0]["honourLabels"] = True
    wrong_type = yaml.safe_load(yaml.safe_dump(good))
    wrong_type["spec"]["podMetricsEndpoints"][0]["port"] = 9464
    no_honor = yaml.safe_load(yaml.safe_dump(good))
    del no_honor["spec"]["podMetricsEndpoints"][0]["honorLabels"]
    for name, bad in [("misspelled field", typo), ("wrong type", wrong_type), ("honorLabels missing", no_honor)]:
        errs = check(bad, "self-test")
        if not errs:
            sys.exit(f"validate-monitors: self-test: a PodMonitor with a {name} passed")
        print(f"validate-monitors: self-test: {name} rejected ({errs[0]})")


def main():
    args = sys.argv[1:]
    if args == ["--self-test"]:
        self_test()
        return
    if not args:
        sys.exit(__doc__)
    errors, n = [], 0
    for path in args:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc.get("kind") in KINDS:
                    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
                        errors.append(f"{path}: {doc.get('kind')}: apiVersion {doc.get('apiVersion')!r} is not monitoring.coreos.com/v1")
                        continue
                    n += 1
                    errors.extend(check(doc, path))
    for e in errors:
        print(e)
    if errors:
        sys.exit(1)
    print(f"validate-monitors: {n} Prometheus Operator objects valid")


if __name__ == "__main__":
    main()
