#!/bin/sh
# Installs libpagewire for C programs: lib/libpagewire.so and lib/libpagewire.a,
# include/pagewire.h and lib/pkgconfig/pagewire.pc under PREFIX (default /usr/local).
#
#   engine/capi/install.sh [--debug] [PREFIX]
#
# Builds the library first (release, or the dev profile with --debug) with $CARGO (default
# cargo), into $CARGO_TARGET_DIR if set. Then `pkg-config --cflags --libs pagewire` links it
# shared, and `pkg-config --static --libs pagewire` lists what a static link needs besides.
set -eu
profile=release
if [ "${1:-}" = "--debug" ]; then
    profile=debug
    shift
fi
prefix=${1:-/usr/local}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cargo=${CARGO:-cargo}
if [ "$profile" = release ]; then
    "$cargo" build --release -p pagewire-capi --manifest-path "$root/Cargo.toml"
else
    "$cargo" build -p pagewire-capi --manifest-path "$root/Cargo.toml"
fi
target=${CARGO_TARGET_DIR:-$root/target}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
cp "$target/$profile/libpagewire.so" "$target/$profile/libpagewire.a" "$prefix/lib/"
cp "$here/include/pagewire.h" "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/pagewire.pc.in" \
    > "$prefix/lib/pkgconfig/pagewire.pc"
echo "installed libpagewire $version under $prefix"
