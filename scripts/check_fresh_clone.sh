#!/usr/bin/env bash
# The README's main command as a user runs it: this repository cloned into an empty temporary
# folder (no ../shared beside it), scripts/setup.sh there (a new .venv, the extension compiled),
# an empty $ROME_FAST_CACHE (no converted model, statistics or data), the Hugging Face hub off.
# Short settings keep it to minutes: one kind of trace, 3 noise samples, 10 texts of the shipped
# WikiText-2 for the statistics. Fails if setup or the demo fails, if anything prints a
# traceback, or if the edit does not move p(' Rome'). KEEP=1 keeps the folder for a look.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/rome_fast_fresh.XXXXXX")"
[ "${KEEP:-0}" = 1 ] && echo "fresh-clone check: keeping $work" || trap 'rm -rf "$work"' EXIT
fail() { echo "fresh-clone check FAILED: $*" >&2; exit 1; }

git clone -q "$src" "$work/rome_fast"
cd "$work/rome_fast"
[ ! -e ../shared ] || fail "$work/shared exists"
export ROME_FAST_CACHE="$work/cache" HF_HUB_OFFLINE=1
t0=$SECONDS
bash scripts/setup.sh > "$work/setup.log" 2>&1 || { tail -40 "$work/setup.log"; fail "scripts/setup.sh"; }
t1=$SECONDS
rc=0
.venv/bin/rome-fast demo --kind hidden --samples 3 --stats-samples 10 --out "$work/demo" \
    > "$work/demo.log" 2>&1 || rc=$?
t2=$SECONDS
cat "$work/demo.log"
[ "$rc" = 0 ] || fail "rome-fast demo exited with $rc"
! grep -q "Traceback" "$work/setup.log" "$work/demo.log" || fail "a traceback was printed"
.venv/bin/python - "$work/demo/edit.json" <<'EOF' || fail "the edit did not work"
import json, sys
r = json.load(open(sys.argv[1]))
key = "p(' Rome')"
before, after = r["before"][0][key], r["after"][0][key]
print(f"fresh-clone check: p(' Rome') {before:.4f} -> {after:.4f}")
sys.exit(0 if after > 0.5 and after > 10 * before else 1)
EOF
echo "fresh-clone check: passed (setup.sh $((t1 - t0)) s, demo $((t2 - t1)) s)"
