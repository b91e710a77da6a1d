#!/usr/bin/env bash
# The README's main command as a user runs it: this repository cloned into an empty temporary
# folder (no ../shared beside it), `bash scripts/setup.sh` there (a new .venv, the extension
# compiled), an empty $ROME_FAST_CACHE (no converted model, statistics or data), the Hugging Face
# hub off, then `rome-fast demo`. Short settings keep the demo to a minute or two: one kind of
# trace, 3 noise samples, 10 texts of the shipped WikiText-2 for the statistics. Fails if setup or
# the demo fails, if anything prints a traceback, or if the edit does not move p(' Rome').
#
# REUSE_VENV=DIR (CI): skip the second setup.sh and run the demo with the packages of DIR, a venv
# that scripts/setup.sh has just built in a clean clone of the same commit, and the compiled core
# built there; the clone's own rome_fast comes first on the path (checked). setup.sh only
# installs packages and reads nothing beside the clone, so what this check adds to CI's own
# setup (a clone with no ../shared, an empty cache) is the same, minutes sooner.
# KEEP=1 keeps the folder for a look.
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
if [ -n "${REUSE_VENV:-}" ]; then
    py="$REUSE_VENV/bin/python"
    cp "$src"/rome_fast/_C*.so "$src/rome_fast/_build_info.json" rome_fast/ 2>/dev/null || true
    export PYTHONPATH="$work/rome_fast"
    "$py" -c 'import rome_fast, sys; sys.exit(not rome_fast.__file__.startswith(sys.argv[1]))' \
        "$work/rome_fast/" || fail "rome_fast is not imported from the clone"
    demo=("$py" -m rome_fast demo)
else
    bash scripts/setup.sh > "$work/setup.log" 2>&1 || { tail -40 "$work/setup.log"; fail "scripts/setup.sh"; }
    ! grep -q "Traceback" "$work/setup.log" || fail "setup.sh printed a traceback"
    py=.venv/bin/python
    demo=(.venv/bin/rome-fast demo)
fi
t1=$SECONDS
rc=0
"${demo[@]}" --kind hidden --samples 3 --stats-samples 10 --out "$work/demo" > "$work/demo.log" 2>&1 || rc=$?
t2=$SECONDS
cat "$work/demo.log"
[ "$rc" = 0 ] || fail "rome-fast demo exited with $rc"
! grep -q "Traceback" "$work/demo.log" || fail "the demo printed a traceback"
grep -q "σ = .* from the 1209 subjects of $work/cache/data/known_1000.json" "$work/demo.log" \
    || fail "σ did not come from the shipped known_1000.json"
"$py" - "$work/demo/edit.json" <<'EOF' || fail "the edit did not work"
import json, sys
r = json.load(open(sys.argv[1]))
key = "p(' Rome')"
before, after = r["before"][0][key], r["after"][0][key]
print(f"fresh-clone check: p(' Rome') {before:.4f} -> {after:.4f}")
sys.exit(0 if after > 0.5 and after > 10 * before else 1)
EOF
echo "fresh-clone check: passed (${REUSE_VENV:+reused $REUSE_VENV, }setup $((t1 - t0)) s, demo $((t2 - t1)) s)"
