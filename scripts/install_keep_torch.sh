#!/usr/bin/env bash
# Install ddpm-lightning into an environment that already has torch (a cluster's CUDA build, a container image),
# without ever replacing that torch, and end with a working `ddpm`:
#
#   scripts/install_keep_torch.sh            # pip install -e .            (PYTHON=python by default)
#   scripts/install_keep_torch.sh bench      # pip install -e ".[bench]"   (any extras, comma-separated)
#   scripts/install_keep_torch.sh --dry-run  # what pip would install (must not list torch), installs nothing
#   scripts/install_keep_torch.sh --check    # only the closing checks below, on what is installed
#   make install-keep-torch EXTRAS=bench
#
# pip gets constraints/ci.txt minus the torch family (torch, torchvision, triton, nvidia-*, cuda-*: the cluster's
# build decides those) plus `torch==<the installed version>` (and torchvision's, when installed): it installs the
# rest at CI's versions, and stops with a conflict rather than swap torch. Then `pip check`, torch's version and CUDA
# before and after (exit 1 if they changed), and the checks: torch and torchvision import together, and `ddpm --help`
# runs. A torchvision built for another variant of the same torch release (PyPI's, built for the CUDA torch, beside
# a CPU build `2.13.0+cpu`) does not load its operators; the script then stops with one line naming the build that
# matches (e.g. `torchvision==0.28.0+cpu` from https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODE=install
case ${1:-} in
    --dry-run) MODE=dry-run; shift ;;
    --check) MODE=check; shift ;;
esac
EXTRAS=${1:-}

torch_id() { "$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'; }
version_of() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
fail() { echo "install_keep_torch: error: $*" >&2; exit 1; }

# where the torchvision that matches this torch comes from: PyTorch's index names its variants by the local label
matching_torchvision() {
    local torch=$1 tv=${2%%+*} label=${1#*+}
    if [[ $torch != *+* ]]; then
        echo "torch $torch is a default build: build torchvision $tv against it, or use the torchvision your cluster provides with it"
    elif [[ $label =~ ^(cpu|cu[0-9]+|rocm[0-9.]+|xpu)$ ]]; then
        echo "$PYTHON -m pip install --force-reinstall --no-deps torchvision==$tv+$label --index-url https://download.pytorch.org/whl/$label"
    else
        echo "torch $torch is a local build: install the torchvision $tv built with it (its module or container), or build it from source"
    fi
}

# the closing checks: torch and torchvision import together, and the console script runs
check() {
    local torch tv err scripts
    torch=$(version_of torch) || fail "no torch in $PYTHON's environment"
    tv=$(version_of torchvision) || fail "no torchvision in $PYTHON's environment; install the one that matches torch $torch"
    if ! err=$("$PYTHON" -c 'import torch, torchvision' 2>&1 >/dev/null); then
        fail "torchvision $tv does not work with torch $torch ($(tail -n 1 <<<"$err")); install the build that matches: $(matching_torchvision "$torch" "$tv")"
    fi
    scripts=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if ! err=$("$scripts/ddpm" --help 2>&1 >/dev/null); then
        fail "\`$scripts/ddpm --help\` fails: $(tail -n 1 <<<"$err")"
    fi
    echo "install_keep_torch: ok: torch $torch, torchvision $tv, \`ddpm --help\` runs ($scripts/ddpm)"
}

if [[ $MODE == check ]]; then check; exit 0; fi
before=$(torch_id) || fail "no torch in $PYTHON's environment; use make install"
echo "install_keep_torch: torch before: $before"
keep=$(mktemp)
trap 'rm -f "$keep"' EXIT
grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' constraints/ci.txt >"$keep"
echo "torch==$(version_of torch)" >>"$keep"
if tv=$(version_of torchvision); then echo "torchvision==$tv" >>"$keep"; fi

DRY_RUN=()
[[ $MODE == dry-run ]] && DRY_RUN=(--dry-run)
"$PYTHON" -m pip install "${DRY_RUN[@]}" -e ".${EXTRAS:+[$EXTRAS]}" -c "$keep"
[[ $MODE == install ]] || exit 0
"$PYTHON" -m pip check || echo "install_keep_torch: pip check reports the conflicts above (not all ours)" >&2
after=$(torch_id)
echo "install_keep_torch: torch after:  $after"
[[ "$before" == "$after" ]] || fail "torch changed"
check
