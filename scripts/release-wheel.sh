#!/usr/bin/env bash
# The wheel of a tagged release, built from the tag's tree alone, into a directory:
#   scripts/release-wheel.sh v0.1.0 tests/releases
# The upgrade test installs the previous release from the wheel kept in tests/releases/,
# since a clone need not carry tags. The build is reproducible: file times come from the
# tag's commit, so the same tag gives the same bytes (the test checks their sha256).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:?usage: release-wheel.sh TAG DEST_DIR}
dest=$(realpath "${2:?usage: release-wheel.sh TAG DEST_DIR}")
git rev-parse --verify --quiet "$tag^{commit}" >/dev/null \
  || { echo "release-wheel: no tag $tag in this clone (git fetch --tags)" >&2; exit 1; }

src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git archive --format=tar "$tag" | tar -x -C "$src"
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct "$tag^{commit}")
export SOURCE_DATE_EPOCH
# The venv's setuptools and Debian's python3-wheel: nothing is fetched.
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps --no-index \
  --no-build-isolation -w "$dest" "$src"
sha256sum "$dest"/*.whl
