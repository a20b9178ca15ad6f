# The steps scripts/make_libero_bundle.sh and scripts/make_metaworld_bundle.sh share, sourced by
# both (not run). Each function reads the caller's variables: PY (the venv python), ROOT (the
# repository), WORK (the build folder), SITE (the venv's site-packages, from check_site on),
# MUJOCO_VERSION, SP (the staged site-packages, from stage_wheel on), OUT_DIR (where the archive
# goes) and its log().

# check_site MODULE REQUIREMENTS PKG...: SITE, the venv's site-packages (where MODULE is), with
# every PKG in it (else: install REQUIREMENTS); an empty stage in $WORK.
check_site() {
  local module="$1" req="$2" pkg
  shift 2
  [[ -x "$PY" ]] || { log "no project venv python ($PY): run scripts/bootstrap.sh first or set PY"; exit 1; }
  SITE="$("$PY" -c "import os, $module; print(os.path.dirname(os.path.dirname($module.__file__)))")"
  for pkg in "$@"; do
    [[ -e "$SITE/$pkg" ]] || { log "$pkg is not in $SITE ($req)"; exit 1; }
  done
  rm -rf "$WORK/stage"
  mkdir -p "$WORK"
}

# fetch_mujoco_wheel DIR: the cp312 manylinux wheel of mujoco==$MUJOCO_VERSION in DIR (downloaded
# unless DIR holds it already) -> WHEEL.
fetch_mujoco_wheel() {
  local dir="$1"
  if ! ls "$dir"/mujoco-$MUJOCO_VERSION-cp312-*.whl >/dev/null 2>&1; then
    log "downloading the cp312 mujoco==$MUJOCO_VERSION wheel into $dir"
    mkdir -p "$dir"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dir" "mujoco==$MUJOCO_VERSION" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  fi
  WHEEL="$(ls "$dir"/mujoco-$MUJOCO_VERSION-cp312-*.whl | head -1)"
}

# collect_used WHAT "ASSET_PREFIX..." COLLECTOR...: the used-files list USED=$WORK/used.txt.
# USED_LIST (an earlier build's list) is copied; else COLLECTOR (a command writing the list to
# $USED) runs from $ROOT, under strace where strace exists: the paths under $SITE it saw opened,
# normalized (MuJoCo opens .../assets/sawyer_xyz/../objects/...), are added, and those under the
# ASSET_PREFIXes (relative to $SITE, space-separated) the collector missed (expected: none) are
# reported ($WORK/strace_only_assets.txt), then kept.
collect_used() {
  local what="$1" prefix n_py t0
  local -a prefixes pats=()
  read -ra prefixes <<< "$2"
  shift 2
  USED="$WORK/used.txt"
  export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-${MUJOCO_GL:-egl}}"
  log "building every task of $what to see which files they read (MUJOCO_GL=$MUJOCO_GL)"
  t0=$(date +%s)
  if [[ -n "${USED_LIST:-}" ]]; then
    cp "$USED_LIST" "$USED"
    log "files used: $(wc -l < "$USED") from USED_LIST=$USED_LIST (not collected again)"
  elif command -v strace >/dev/null 2>&1; then
    (cd "$ROOT" && strace -f -qq -e trace=openat,open -e status=successful -o "$WORK/strace.txt" \
      "$@") 2>"$WORK/collect.log" || { tail -20 "$WORK/collect.log" >&2; exit 1; }
    # Paths in quotes after openat(AT_FDCWD, "...".
    grep -oE 'open(at)?\((AT_FDCWD, )?"[^"]+"' "$WORK/strace.txt" | sed -E 's/.*"([^"]+)"$/\1/' |
      "$PY" -c 'import os, sys; print("".join(os.path.normpath(l.rstrip("\n")) + "\n" for l in sys.stdin), end="")' |
      grep "^$SITE/" | sort -u > "$WORK/strace_paths.txt"
    n_py=$(wc -l < "$USED")
    for prefix in "${prefixes[@]}"; do pats+=(-e "^$SITE/$prefix"); done
    grep "${pats[@]}" "$WORK/strace_paths.txt" | sort -u | comm -23 - <(sort -u "$USED") \
      > "$WORK/strace_only_assets.txt" || true
    sort -u "$USED" "$WORK/strace_paths.txt" | while read -r f; do [[ -f "$f" ]] && echo "$f"; done \
      > "$USED.all"
    mv "$USED.all" "$USED"
    log "files used: $n_py seen by Python + XML, $(wc -l < "$USED") with strace's; asset files only" \
        "strace saw: $(wc -l < "$WORK/strace_only_assets.txt") ($(( $(date +%s) - t0 )) s)"
  else
    (cd "$ROOT" && "$@") 2>"$WORK/collect.log" || { tail -20 "$WORK/collect.log" >&2; exit 1; }
    log "files used: $(wc -l < "$USED") (no strace here: Python's opens + XML only; $(( $(date +%s) - t0 )) s)"
  fi
}

# stage_wheel NAME: STAGE=$WORK/stage/NAME, SP=$STAGE/site-packages holding $WHEEL unpacked (a
# wheel is a zip).
stage_wheel() {
  STAGE="$WORK/stage/$1"
  SP="$STAGE/site-packages"
  mkdir -p "$SP"
  "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$WHEEL" "$SP"
}

copy_tree() {  # copy_tree NAME [tar --exclude patterns...]: $SITE/NAME into $SP, minus excludes
  local name="$1"; shift
  tar -C "$SITE" --exclude='__pycache__' "$@" -cf - "$name" | tar -C "$SP" -xf -
}

copy_dist_info() {  # copy_dist_info DIST...: each $SITE/DIST-*.dist-info into $SP
  local dist d
  for dist in "$@"; do
    for d in "$SITE"/$dist-*.dist-info; do cp -a "$d" "$SP/"; done
  done
}

# copy_used_assets ASSET_PREFIX...: the files of $USED under the prefixes (relative to $SITE) into
# $SP, same relative paths -> n_assets (how many).
copy_used_assets() {
  local f rel prefix
  n_assets=0
  while read -r f; do
    rel="${f#"$SITE"/}"
    for prefix in "$@"; do
      if [[ "$rel" == "$prefix"* ]]; then
        mkdir -p "$SP/$(dirname "$rel")"; cp -a "$f" "$SP/$rel"; n_assets=$((n_assets + 1))
        break
      fi
    done
  done < "$USED"
}

# pack_and_list NAME DESCRIPTION HEAD_FN TAIL_FN: $WORK/stage/NAME packed with xz -9 as
# $OUT_DIR/NAME.tar.xz, and $OUT_DIR/NAME.txt saying what is in it: when and from what it was
# built (DESCRIPTION: for which tasks), its sizes, the wheel, HEAD_FN's lines, the unpacked sizes
# of site-packages' entries, TAIL_FN's lines (HEAD_FN, TAIL_FN: functions; `:` for none).
pack_and_list() {
  local name="$1" what="$2" head_fn="$3" tail_fn="$4"
  local archive="$OUT_DIR/$name.tar.xz" stage="$WORK/stage/$name"
  mkdir -p "$OUT_DIR"
  tar -C "$WORK/stage" -cf - "$name" | xz -T0 -9 > "$archive.tmp"
  mv "$archive.tmp" "$archive"
  {
    echo "built $(date -u +%FT%TZ) from $(cd "$ROOT" && git rev-parse --short HEAD) for CPython 3.12; $what"
    echo "unpacked: $(du -sh "$stage" | cut -f1); archive: $(du -h "$archive" | cut -f1) ($(stat -c %s "$archive") bytes)"
    echo "mujoco wheel: $(basename "$WHEEL"); asset files kept: $n_assets of the used list's $(wc -l < "$USED")"
    "$head_fn"
    echo "unpacked sizes (site-packages/...):"
    (cd "$stage/site-packages" && du -s --block-size=1K -- * | sort -rn | awk '{printf "  %8d KiB  %s\n", $1, $2}')
    "$tail_fn"
  } > "$OUT_DIR/$name.txt"
  log "$(sed -n 2p "$OUT_DIR/$name.txt")"
  log "ready: $archive"
}
