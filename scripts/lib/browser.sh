# Sourced by scripts/test: the dashboard's browser tests drive Debian's Chromium (no browser
# download). Install it when missing and this user can; otherwise say what to do.

ensure_chromium() {
    if command -v chromium >/dev/null 2>&1; then return 0; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium for the browser tests" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium >/dev/null
    else
        echo "chromium is not installed: the browser tests will fail." \
            "Install it with: sudo apt-get install chromium" >&2
    fi
}
