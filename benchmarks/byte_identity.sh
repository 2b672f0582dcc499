#!/usr/bin/env bash
# Do two commits publish the same run artifacts?
#
#   bash benchmarks/byte_identity.sh OLD_COMMIT NEW_COMMIT
#
# Checks each commit out in its own git worktree with its own venv (each venv sees only its own
# worktree), runs the same jobs in each from an empty folder with its own store, checkpoint cache
# and PREFECT_HOME, and compares the runs pairwise with benchmarks/compare_runs.py:
#   default   expertbits quantize (the embedded defaults)
#   gptq      expertbits quantize --quantizer gptq
# and the compressed-tensors exports of the default run (when it is refused, as per-expert widths
# are by design, of a `--granularity layer --symmetric` run instead). A job whose flags either
# commit's `quantize --help` lacks is skipped and said so. Stores, logs and wall times stay in the
# printed work folder ($BYTE_IDENTITY_JOBS picks jobs, e.g. "default gptq export"); the worktrees
# and venvs are removed on exit. The exit status is compare_runs.py's: 1 if anything differs really.
set -euo pipefail

old_commit=${1:?usage: byte_identity.sh OLD_COMMIT NEW_COMMIT}
new_commit=${2:?usage: byte_identity.sh OLD_COMMIT NEW_COMMIT}
jobs=${BYTE_IDENTITY_JOBS:-default gptq export}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
compare=$repo/benchmarks/compare_runs.py  # the caller's copy: both sides are compared by one script
work=$(mktemp -d "${TMPDIR:-/tmp}/byte-identity.XXXXXX")
echo "work folder: $work"

cleanup() {
    for side in old new; do
        [ -d "$work/$side/src" ] && git -C "$repo" worktree remove --force "$work/$side/src" || true
        rm -rf "$work/$side/v"  # GBs of torch; the stores and logs are kept
    done
    git -C "$repo" worktree prune
}
trap cleanup EXIT

setup() {  # side commit
    local side=$1 commit=$2
    mkdir -p "$work/$side"
    git -C "$repo" worktree add --quiet --detach "$work/$side/src" "$commit"
    echo "$side: $(git -C "$work/$side/src" log -1 --format='%h %s' | cut -c1-100)"
    python3 -m venv "$work/$side/v"
    if ! (cd "$work/$side/src" && . ../v/bin/activate \
            && nice -n 10 pip install -q -c infra/constraints.txt -e . >"$work/$side/pip.log" 2>&1); then
        echo "$side: pip install failed, see $work/$side/pip.log"; return 1
    fi
    # the venv must import expertbits from its own worktree, never from another checkout
    (cd "$work" && "$work/$side/v/bin/python" -c 'import expertbits.flows, sys; print(expertbits.flows.__file__)') \
        | tee "$work/$side/imports-from"
    grep -q "^$work/$side/src/" "$work/$side/imports-from"
}

in_side() {  # side command...: run in the side's venv from an empty folder, with its own state
    local side=$1; shift
    mkdir -p "$work/$side/cwd" "$work/$side/prefect"
    (cd "$work/$side/cwd" && env -u PYTHONPATH -u EXPERTBITS_DASK PATH="$work/$side/v/bin:$PATH" \
        VIRTUAL_ENV="$work/$side/v" EXPERTBITS_CACHE="$work/$side/cache" PREFECT_HOME="$work/$side/prefect" \
        OMP_NUM_THREADS=1 PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 PREFECT_SERVER_ANALYTICS_ENABLED=false \
        nice -n 10 "$@")
}

has_flags() {  # flag...: does every side's `quantize --help` list them?
    local side flag
    for side in old new; do
        for flag in "$@"; do
            grep -q -- "$flag\b" "$work/$side/quantize-help" || { echo "the $side commit's quantize lacks $flag"; return 1; }
        done
    done
}

quantize() {  # job flags...: run `quantize` on both sides; the run folders go to $work/<side>/<job>.run
    local job=$1 side start; shift
    for side in old new; do
        start=$SECONDS
        if ! in_side "$side" expertbits quantize --store "$work/$side/store-$job" "$@" >"$work/$side/$job.log" 2>&1; then
            echo "$job: $side failed, see $work/$side/$job.log"; tail -20 "$work/$side/$job.log"; return 1
        fi
        echo "$job $side: $((SECONDS - start)) s" | tee -a "$work/times"
        ls -d "$work/$side/store-$job"/runs/*/ | head -1 >"$work/$side/$job.run"
    done
}

status=0
compare_pair() {  # label old-folder new-folder
    echo "== $1: $2 vs $3"
    python "$compare" "$2" "$3" --same "$work/old" "$work/new" | tee "$work/compare-$1.txt" || status=1
}

setup old "$old_commit" & old_pid=$!
setup new "$new_commit" & new_pid=$!
failed=0; wait $old_pid || failed=1; wait $new_pid || failed=1
[ $failed = 0 ] || { echo "setup failed"; exit 2; }
for side in old new; do in_side "$side" expertbits quantize --help >"$work/$side/quantize-help"; done
. "$work/new/v/bin/activate"  # compare_runs.py needs duckdb, pandas, numpy: the new side's

for job in $jobs; do
    case $job in
        default) quantize default && compare_pair default "$(cat "$work/old/default.run")" "$(cat "$work/new/default.run")" ;;
        gptq) has_flags --quantizer && quantize gptq --quantizer gptq \
                  && compare_pair gptq "$(cat "$work/old/gptq.run")" "$(cat "$work/new/gptq.run")" ;;
        export)
            exported=default
            for side in old new; do
                run=$(cat "$work/$side/default.run" 2>/dev/null) || { echo "export: no default run"; break; }
                if ! in_side "$side" expertbits export "$run" --format compressed-tensors --out "$work/$side/export-default" \
                        >"$work/$side/export-default.log" 2>&1; then
                    echo "export of the default run refused ($side): $(tail -1 "$work/$side/export-default.log")"
                    exported=layer-sym
                fi
            done
            if [ "$exported" = layer-sym ] && has_flags --granularity --symmetric; then
                quantize layer-sym --granularity layer --symmetric
                for side in old new; do
                    in_side "$side" expertbits export "$(cat "$work/$side/layer-sym.run")" --format compressed-tensors \
                        --out "$work/$side/export-layer-sym" >"$work/$side/export-layer-sym.log" 2>&1
                done
                compare_pair layer-sym "$(cat "$work/old/layer-sym.run")" "$(cat "$work/new/layer-sym.run")"
            fi
            # an export folder names no run: its run ids are given as --same pairs
            [ -d "$work/old/export-$exported" ] && [ -d "$work/new/export-$exported" ] && {
                echo "== export-$exported"
                python "$compare" "$work/old/export-$exported" "$work/new/export-$exported" --same "$work/old" "$work/new" \
                    --same "$(basename "$(cat "$work/old/$exported.run")")" "$(basename "$(cat "$work/new/$exported.run")")" \
                    | tee "$work/compare-export-$exported.txt" || status=1
            } ;;
        *) echo "unknown job $job"; status=2 ;;
    esac
done
echo "== wall times"; cat "$work/times"
echo "results in $work"
exit $status
