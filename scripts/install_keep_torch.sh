#!/usr/bin/env bash
# Install ddpm-lightning into an environment that already has torch (a cluster's CUDA build, a container image),
# without ever replacing that torch:
#
#   scripts/install_keep_torch.sh            # pip install -e .            (PYTHON=python by default)
#   scripts/install_keep_torch.sh bench      # pip install -e ".[bench]"   (any extras, comma-separated)
#   scripts/install_keep_torch.sh --dry-run  # what pip would install (must not list torch), installs nothing
#   make install-keep-torch EXTRAS=bench
#
# pip gets constraints/ci.txt minus the torch family (torch, torchvision, triton, nvidia-*, cuda-*: the cluster's
# build decides those) plus `torch==<the installed version>` (and torchvision's, when installed): it installs the
# rest at CI's versions, and stops with a conflict rather than swap torch. Then `pip check`, and torch's version
# and CUDA are printed before and after; exit 1 if they changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY_RUN=()
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=(--dry-run); shift; fi
EXTRAS=${1:-}

torch_id() { "$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'; }
version_of() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }

before=$(torch_id) || { echo "install_keep_torch: no torch in $PYTHON's environment; use make install" >&2; exit 1; }
echo "install_keep_torch: torch before: $before"
keep=$(mktemp)
trap 'rm -f "$keep"' EXIT
grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' constraints/ci.txt >"$keep"
echo "torch==$(version_of torch)" >>"$keep"
if tv=$(version_of torchvision); then echo "torchvision==$tv" >>"$keep"; fi

"$PYTHON" -m pip install "${DRY_RUN[@]}" -e ".${EXTRAS:+[$EXTRAS]}" -c "$keep"
[[ ${#DRY_RUN[@]} -eq 0 ]] || exit 0
"$PYTHON" -m pip check || echo "install_keep_torch: pip check reports the conflicts above (not all ours)" >&2
after=$(torch_id)
echo "install_keep_torch: torch after:  $after"
[[ "$before" == "$after" ]] || { echo "install_keep_torch: error: torch changed" >&2; exit 1; }
