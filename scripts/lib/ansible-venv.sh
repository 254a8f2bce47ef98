# The Ansible venv of the deployment tests (ansible/converge-test.sh, ansible/farm-test.sh):
#   . scripts/lib/ansible-venv.sh; ansible_venv VENV REQUIREMENTS_FILE
# Creates VENV, or refreshes it when the requirements file (or ansible/requirements.txt, which it
# includes) changed since the last install; a stamp file inside the venv remembers them.
ansible_venv() {
    local venv=$1 req=$2 dir stamp want
    dir=$(cd "$(dirname "$req")" && pwd)
    stamp="$venv/.hyperfarm-$(basename "$req" .txt)"
    want=$(cat "$dir/requirements.txt" "$req")
    if [[ -x $venv/bin/ansible-playbook && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return 0
    fi
    echo "installing $(basename "$req") into $venv" >&2
    if [[ ! -x $venv/bin/python ]] && ! python3 -m venv "$venv"; then
        echo "cannot create $venv (apt-get install python3-venv)" >&2
        return 1
    fi
    (cd "$dir" && "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$(basename "$req")")
    printf '%s' "$want" >"$stamp"
}
