#!/usr/bin/env python3
"""Checks that two renderings of weir's manifests hold the same objects.

    compare-renders.py KUSTOMIZE.yaml HELM.yaml

The kustomize base (deploy/kubernetes/base) and the Helm chart's default
values (deploy/helm/weir, release "weir" in namespace "weir-system") must
produce the same objects, field for field, with two exceptions, both
decided on purpose:

- the labels only Helm sets (helm.sh/chart, app.kubernetes.io/managed-by,
  app.kubernetes.io/instance, app.kubernetes.io/version) are left out, on
  every object and on the pod template;
- the Namespace: the base declares weir-system with its Pod Security and
  injection labels; with Helm the namespace is the release's
  (`--create-namespace`), which a chart must not also declare (docs/
  kubernetes.md says which labels to put on it).

Comments and key order do not matter (the YAML is parsed), nor does the
order of lists whose items are named (volumes, env, ports, containers,
volumeMounts): Kubernetes merges them by name, and kustomize's patches
reorder them. Exits 1 with a
diff of each object that differs, or naming objects only one side has.
"""

import difflib
import sys

import yaml

HELM_ONLY_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
}


def strip_labels(meta):
    labels = (meta or {}).get("labels")
    if labels:
        for k in HELM_ONLY_LABELS:
            labels.pop(k, None)


def normalize(node):
    """Sorts lists of named items by name, everywhere."""
    if isinstance(node, dict):
        return {k: normalize(v) for k, v in node.items()}
    if isinstance(node, list):
        items = [normalize(v) for v in node]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            items.sort(key=lambda v: str(v["name"]))
        return items
    return node


def objects(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    out = {}
    for d in docs:
        if d.get("kind") == "Namespace":
            continue
        strip_labels(d.get("metadata"))
        tmpl = d.get("spec", {}).get("template")
        if isinstance(tmpl, dict):
            strip_labels(tmpl.get("metadata"))
        m = d.get("metadata", {})
        key = (d.get("kind"), m.get("namespace", ""), m.get("name"))
        if key in out:
            sys.exit(f"{path}: {key} appears twice")
        out[key] = normalize(d)
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a_path, b_path = sys.argv[1], sys.argv[2]
    a, b = objects(a_path), objects(b_path)
    bad = False
    for key in sorted(set(a) | set(b), key=str):
        if key not in a or key not in b:
            where = b_path if key not in a else a_path
            print(f"compare: {key} only in {where}")
            bad = True
            continue
        if a[key] != b[key]:
            bad = True
            ya = yaml.safe_dump(a[key], sort_keys=True).splitlines()
            yb = yaml.safe_dump(b[key], sort_keys=True).splitlines()
            print(f"compare: {key} differs:")
            for line in difflib.unified_diff(ya, yb, a_path, b_path, lineterm=""):
                print("  " + line)
    if bad:
        sys.exit(1)
    print(f"compare: {len(a)} objects identical in {a_path} and {b_path}")


if __name__ == "__main__":
    main()
