# Sourced by the CI legs: python_for X.Y prints the path of a Python X.Y interpreter (pyenv's, else the system's).
python_for() {
    local root found
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    found=$(ls -d "$root"/versions/"$1".*/bin/python3 2>/dev/null | sort -V | tail -1)
    [ -n "$found" ] || found=$(ls /usr/bin/python"$1" /usr/local/bin/python"$1" 2>/dev/null | head -1)
    [ -n "$found" ] || { echo "ci: no Python $1 on this machine (pyenv install $1 would add one)" >&2; return 1; }
    echo "$found"
}
