# Helpers for assembling small root file systems from this host's own binaries, for images made
# with `docker import` on machines without a registry. Source this file; set $root first.

# Copies a binary and every library ldd lists for it into $root, keeping their paths.
copy_with_libs() {
    local bin="$1"
    install -D -m 0755 "$bin" "$root$bin"
    ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 0755 "$lib" "$root$lib"
    done
}

# Adds /bin/sh (dash) and the /lib, /lib64 symlinks of a merged-/usr host.
add_shell() {
    copy_with_libs /usr/bin/dash
    mkdir -p "$root/bin" "$root/usr/bin" "$root/usr/sbin" "$root/tmp"
    chmod 1777 "$root/tmp"
    ln -sf /usr/bin/dash "$root/bin/sh"
    for lib in lib lib64; do
        [ -L "/$lib" ] && ln -sfn "usr/$lib" "$root/$lib"
    done
    printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$root/etc/nsswitch.conf"
}
