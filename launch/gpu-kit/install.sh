#!/usr/bin/env bash
# Install the GPU kit beside this machine's own torch, with no network (the kit folder holds this script):
#
#     KIT/install.sh [PROJECT]
#
# PROJECT is the sftdist checkout (default: the nearest folder above the kit that holds one, e.g. PROJECT
# for PROJECT/build/gpu-kit, where `make gpu-kit` puts it). pip, run against this
# Python's environment with torch pinned to the installed build, decides which of sftdist's dependencies
# are missing or in a version the pins exclude; exactly those are installed from the kit's wheels into
# SITE, with --no-deps (nothing else of the environment is touched, torch is never reinstalled).
# KIT/env.sh then puts SITE and PROJECT first on PYTHONPATH and SITE/bin first on PATH:
# `source KIT/env.sh && KIT/gpu-check.sh`.
#
# Variables: PYTHON (default: python3), SITE (default: KIT/site).
set -euo pipefail

kit=$(cd "$(dirname "$0")" && pwd)
project=${1:-}
if [[ -z $project ]]; then
    for candidate in "$kit/.." "$kit/../.."; do
        if [[ -f $candidate/sftdist/__init__.py ]]; then
            project=$candidate
            break
        fi
    done
fi
project=$(cd "${project:-.}" && pwd)
python=${PYTHON:-python3}
site=${SITE:-$kit/site}

if [[ ! -f $project/sftdist/__init__.py ]]; then
    echo "install.sh: $project is not an sftdist checkout; pass its path: $0 PROJECT" >&2
    exit 2
fi
if ! torch=$("$python" -c 'import torch; print(torch.__version__)'); then
    echo "install.sh: $python cannot import torch; set PYTHON to the interpreter of the machine's torch" >&2
    exit 2
fi
echo "install.sh: $("$python" --version), torch $torch, kit $kit, project $project"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "torch==$torch" >"$scratch/constraints.txt"

# What this environment lacks, as pip resolves it: a dependency the kit does not hold stops here, named by pip.
"$python" -m pip install --dry-run --quiet --no-index --find-links "$kit/wheels" \
    --constraint "$scratch/constraints.txt" --requirement "$kit/requirements.txt" --report "$scratch/report.json"
mapfile -t wanted < <("$python" -c '
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])
' "$scratch/report.json")

rm -rf "$site"
mkdir -p "$site"
if ((${#wanted[@]})); then
    echo "install.sh: installing into $site: ${wanted[*]}"
    "$python" -m pip install --quiet --no-index --find-links "$kit/wheels" --no-deps --target "$site" "${wanted[@]}"
else
    echo "install.sh: this environment already has every dependency"
fi

cat >"$kit/env.sh" <<ENV
# source this file: sftdist and the kit's packages first on the module path, their programs (ninja, which
# DeepSpeed's JIT-built ops need) first on PATH, no network
export PYTHONPATH="$site:$project\${PYTHONPATH:+:\$PYTHONPATH}"
export PATH="$site/bin\${PATH:+:\$PATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ENV

# The check: sftdist's CLI and every dependency import, in versions that requirements.txt allows.
PYTHONPATH="$site:$project${PYTHONPATH:+:$PYTHONPATH}" "$python" -c '
import importlib, sys
from importlib import metadata
from packaging.requirements import Requirement
import sftdist.cli
bad = []
for line in filter(None, map(str.strip, open(sys.argv[1]))):
    req = Requirement(line)
    importlib.import_module({"pyyaml": "yaml"}.get(req.name.lower(), req.name.replace("-", "_")))
    if metadata.version(req.name) not in req.specifier:
        bad.append(f"{req.name} {metadata.version(req.name)} (wanted {req.specifier})")
if bad:
    sys.exit("install.sh: wrong versions import: " + ", ".join(bad))
print("install.sh: sftdist and its dependencies import; next: source " + sys.argv[2] + "/env.sh && " + sys.argv[2] + "/gpu-check.sh")
' "$kit/requirements.txt" "$kit"
