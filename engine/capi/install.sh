#!/bin/sh
# Installs libpagewire for C programs: lib/libpagewire.so and lib/libpagewire.a,
# include/pagewire.h and lib/pkgconfig/pagewire.pc under PREFIX (default /usr/local).
#
#   engine/capi/install.sh [--debug] [--from DIR] [PREFIX]
#
# Builds the library first (release, or the dev profile with --debug) with $CARGO (default
# cargo), into $CARGO_TARGET_DIR if set. --from DIR builds nothing and installs the libraries
# an earlier build left in DIR (the test suite passes target/debug/deps, where its own build
# puts them). Cargo names the files after the crate's library, libpagewire_capi.so and .a;
# they are installed as libpagewire.so and .a. Then
# `pkg-config --cflags --libs pagewire` links it shared, and `pkg-config --static --libs
# pagewire` lists what a static link needs besides.
set -eu
profile=release
from=
usage="usage: install.sh [--debug] [--from DIR] [PREFIX]"
while [ $# -gt 0 ]; do
    case "$1" in
        --debug) profile=debug ;;
        --from)
            [ $# -ge 2 ] || { echo "install.sh: --from needs a directory ($usage)" >&2; exit 2; }
            from=$2
            shift
            ;;
        -*) echo "install.sh: unknown option $1 ($usage)" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
if [ -n "$from" ] && [ "$profile" = debug ]; then
    echo "install.sh: --debug chooses what to build, and --from builds nothing: give one ($usage)" >&2
    exit 2
fi
prefix=${1:-/usr/local}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cargo=${CARGO:-cargo}
if [ -z "$from" ]; then
    if [ "$profile" = release ]; then
        "$cargo" build --release -p pagewire-capi --manifest-path "$root/Cargo.toml"
    else
        "$cargo" build -p pagewire-capi --manifest-path "$root/Cargo.toml"
    fi
    from=${CARGO_TARGET_DIR:-$root/target}/$profile
fi
for ext in so a; do
    if [ ! -f "$from/libpagewire_capi.$ext" ]; then
        echo "install.sh: $from/libpagewire_capi.$ext is missing: build pagewire-capi first" >&2
        exit 1
    fi
done
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
cp "$from/libpagewire_capi.so" "$prefix/lib/libpagewire.so"
cp "$from/libpagewire_capi.a" "$prefix/lib/libpagewire.a"
cp "$here/include/pagewire.h" "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/pagewire.pc.in" \
    > "$prefix/lib/pkgconfig/pagewire.pc"
echo "installed libpagewire $version under $prefix"
