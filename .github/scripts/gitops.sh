#!/usr/bin/env bash
# The GitOps chain: what the workflows in .github/workflows/ run, and what tests/test_workflows.py
# runs against real git repositories and the fake hub, so the tests cannot drift from CI.
#
#   gitops.sh plan     changed -> validate -> plan --markdown: the pull-request summary
#   gitops.sh deploy   changed -> validate -> deploy -> destroy the apps of deleted manifests
#                      (and, when the base is unknown, every orphaned app that `status` lists);
#                      nothing is destroyed when a deploy failed
#
# Inputs come from the environment, never from a workflow's command line, so no pull-request
# title, branch or file name is ever pasted into shell code:
#   GITOPS_BASE     the commit before the change (all-zero = unknown: every manifest, and prune)
#   GITOPS_HEAD     the commit after it (default HEAD)
#   GITOPS_OUT      where changes.json and summary.md go (default $RUNNER_TEMP/gitops)
#   GITOPS_DRY_RUN  1: `deploy --dry-run`, and say what would be destroyed instead of destroying
set -euo pipefail

mode="${1:-}"
if [[ "$mode" != plan && "$mode" != deploy ]]; then
  echo "usage: gitops.sh plan|deploy (with GITOPS_BASE and GITOPS_HEAD set)" >&2
  exit 2
fi
base="${GITOPS_BASE:?GITOPS_BASE is not set}"
head="${GITOPS_HEAD:-HEAD}"
out="${GITOPS_OUT:-${RUNNER_TEMP:-/tmp}/gitops}"
summary="${GITHUB_STEP_SUMMARY:-/dev/null}"
mkdir -p "$out"

# Fields of the JSON that `changed` and `status` write, NUL-separated so that no file name
# (spaces, newlines, a leading '-') is split or read as a flag. python3 rather than jq: it is on
# every machine this runs on, jq is not.
json_items() {
  python3 -c '
import json, sys
path, what = sys.argv[1], sys.argv[2]
with open(path, encoding="utf-8") as handle:
    data = json.load(handle)
if what == "deploy":
    items = data["deploy"]
elif what == "remove":
    items = [entry["app"] for entry in data["remove"]]
elif what == "prune":
    items = ["true" if data["prune_orphans"] else "false"]
elif what == "orphans" and isinstance(data, list):
    items = [entry["app_name"] for entry in data if entry.get("state") == "orphan"]
else:
    sys.exit(f"gitops.sh: no {what} in {path}")
sys.stdout.write("".join(f"{item}\0" for item in items))
' "$@"
}

gguf-deploy changed --base "$base" --head "$head" --json >"$out/changes.json"
gguf-deploy changed --base "$base" --head "$head" >"$out/changes.txt"
cat "$out/changes.txt"
gguf-deploy validate

mapfile -d '' -t deploy < <(json_items "$out/changes.json" deploy)
mapfile -d '' -t remove < <(json_items "$out/changes.json" remove)
prune="$(json_items "$out/changes.json" prune | tr -d '\0')"
status=0

if [[ "$mode" == plan ]]; then
  {
    echo "<!-- gguf-deploy-plan -->"
    echo "### Changed manifests"
    echo
    echo '```text'
    cat "$out/changes.txt"
    echo '```'
    echo
    if ((${#deploy[@]})); then
      gguf-deploy plan --markdown -- "${deploy[@]}" || status=$?
    else
      echo "No manifest to plan."
    fi
  } >"$out/summary.md"
  cat "$out/summary.md" >>"$summary"
  exit "$status"
fi

dry_run=()
if [[ "${GITOPS_DRY_RUN:-}" == 1 ]]; then
  dry_run=(--dry-run)
fi

# Deploy first, destroy after: an app renamed by its manifest is never down in between.
if ((${#deploy[@]})); then
  gguf-deploy deploy "${dry_run[@]}" -- "${deploy[@]}" || status=$?
fi

if ((${#remove[@]} == 0)) && [[ "$prune" != true ]]; then
  exit "$status"
fi
# The failed deploy may be the new app of a renamed manifest: destroying the old one now would
# leave neither up. This run fails, so the next one diffs from the same base and does both.
if ((status != 0)); then
  echo "note: a deploy failed, so no app was destroyed; the next deploy run destroys them" >&2
  exit "$status"
fi
if ((${#dry_run[@]})); then
  for app in "${remove[@]}"; do
    echo "dry run: would destroy $app, if it is live"
  done
  if [[ "$prune" == true ]]; then
    echo "dry run: would destroy every orphaned app that 'gguf-deploy status' lists"
  fi
  exit "$status"
fi

# A removed app is live only if `status` lists it as an orphan (a live app that no manifest
# produces); one that is already gone needs nothing, so a retried run does not fail on it.
# Orphans need no plan, so `--offline` spares a Hugging Face request per manifest; `status`
# exits 1 for a manifest it cannot plan from the cache, and still lists every orphan.
gguf-deploy status --offline --json >"$out/status.json" || true
if ! json_items "$out/status.json" orphans >"$out/orphans" 2>/dev/null; then
  echo "error: 'gguf-deploy status' could not list the live apps; nothing was destroyed" >&2
  exit 1
fi
mapfile -d '' -t orphans <"$out/orphans"
for app in "${orphans[@]}"; do
  wanted=false
  [[ "$prune" == true ]] && wanted=true
  for removed in "${remove[@]}"; do
    [[ "$app" == "$removed" ]] && wanted=true
  done
  if [[ "$wanted" == true ]]; then
    gguf-deploy destroy --yes -- "$app" || status=$?
  else
    echo "note: $app is live with no manifest; a full sync (Run workflow) removes it"
  fi
done
exit "$status"
