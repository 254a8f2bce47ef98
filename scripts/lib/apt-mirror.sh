# Print the Debian archive this machine's apt uses (never a host named in the repository): the
# first main-archive URI of /etc/apt/sources.list.d/*.sources (deb822) or of a `deb` line of
# /etc/apt/sources.list(.d/*.list); security and updates archives are skipped.
#   . scripts/lib/apt-mirror.sh; mirror=$(apt_mirror) || exit 1
apt_mirror() {
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' \
        | grep -v -e security -e updates | head -n 1)
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
            | grep -v -e security -e updates | head -n 1)
    fi
    if [ -z "$uri" ]; then
        echo "no Debian archive found in this machine's apt configuration (/etc/apt/sources.list*); set HYPERFARM_DEBIAN_MIRROR" >&2
        return 1
    fi
    printf '%s\n' "${uri%/}"
}
