#!/usr/bin/env bash
# Validates weir's Kubernetes manifests against the Kubernetes API schemas,
# offline, with the `kubernetes-validate` package from PyPI (installed into
# a virtualenv under target/ on first use).
#
# - every YAML file under deploy/kubernetes/ that is a Kubernetes object
#   (the kustomization.yaml files are kustomize's, not the API's);
# - the kustomize-rendered output of the base and of every overlay, when
#   `kubectl` (which embeds kustomize) or `kustomize` is installed; each
#   must render, and must hold the objects weir needs.
#
# Strict mode: unknown fields are errors. Checked against the oldest and
# newest Kubernetes versions weir supports (override with
# WEIR_K8S_VERSIONS="1.30.0 1.37.0").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

versions=(${WEIR_K8S_VERSIONS:-1.30.0 1.33.0 1.37.0})
venv="target/validate-venv"
validator="$venv/bin/kubernetes-validate"
if [[ ! -x "$validator" ]]; then
    echo "validate: installing kubernetes-validate into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi

mapfile -t files < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
if [[ ${#files[@]} -eq 0 ]]; then
    echo "validate: no manifests found under deploy/kubernetes" >&2
    exit 1
fi

for v in "${versions[@]}"; do
    echo "validate: ${#files[@]} files against Kubernetes $v"
    "$validator" --strict --quiet -k "$v" "${files[@]}"
done

render=()
if command -v kubectl >/dev/null 2>&1; then
    render=(kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
    render=(kustomize build)
fi
if [[ ${#render[@]} -eq 0 ]]; then
    echo "validate: neither kubectl nor kustomize found; rendered output not checked (the plain files were)"
    exit 0
fi

out="target/deploy-rendered"
mkdir -p "$out"
for dir in deploy/kubernetes/base deploy/kubernetes/overlays/*/; do
    dir="${dir%/}"
    name="$(echo "${dir#deploy/kubernetes/}" | tr '/' '-')"
    rendered="$out/$name.yaml"
    "${render[@]}" "$dir" >"$rendered"
    for kind in Namespace ServiceAccount ClusterRole ClusterRoleBinding DaemonSet; do
        if ! grep -q "^kind: $kind\$" "$rendered"; then
            echo "validate: $dir renders no $kind" >&2
            exit 1
        fi
    done
    for v in "${versions[@]}"; do
        "$validator" --strict --quiet -k "$v" "$rendered"
    done
    echo "validate: $dir renders and validates ($rendered)"
done
echo "validate: all manifests valid"
