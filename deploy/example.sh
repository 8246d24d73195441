#!/usr/bin/env bash
# The README's "Deploying a swarm", step by step: `deploy/example.sh STEP` runs one step, on the
# machine the step names, in that machine's fincluster directory (/etc/fincluster in the systemd
# units), which holds the files the step reads: the deploy/*.toml for its role, policies/ and
# clearances.toml (the same on every node), certificates, tokens. README.md shows every step verbatim
# and tests/test_deploy.py runs them all on one machine, each host a loopback address of its own.
set -euo pipefail

DOMAIN="${DOMAIN:-bank.example}"                 # the SPIFFE trust domain
REGISTRY_HOST="${REGISTRY_HOST:-reg1.bank.example}" # each host's DNS name or IP, as peers dial it
GPU_A_HOST="${GPU_A_HOST:-gpu-a.bank.example}"  # the trusted server (blocks 0:10, the sensitive prefix)
GPU_B_HOST="${GPU_B_HOST:-gpu-b.bank.example}"  # a standard server (blocks 10:30)
REGISTRY_PORT="${REGISTRY_PORT:-7000}"
SERVER_PORT="${SERVER_PORT:-7001}"
MODEL="${MODEL:-smollm2-135m-instruct}"          # a store alias, a transformers directory or a .gguf

store() {  # on every server and client host (or once, then copy stores/smollm2 to them)
    fincluster model import "$MODEL" --out stores/smollm2
    fincluster model verify stores/smollm2
}

pki() {  # on the CA machine (the only one that holds certs/ca.key)
    fincluster certs init-ca --dir certs --trust-domain "$DOMAIN"
    fincluster certs issue --dir certs --role registry --name reg1 --host "$REGISTRY_HOST" --ttl 30d
    fincluster certs issue --dir certs --role server --name gpu-a --host "$GPU_A_HOST" --ttl 30d
    fincluster certs issue --dir certs --role server --name gpu-b --host "$GPU_B_HOST" --ttl 30d
    fincluster certs issue --dir certs --role client --name alice --ttl 30d
    # to each node: certs/ca.pem, certs/crl.pem and its own certs/nodes/<role>-<name>.pem + .key
}

attest() {  # on the offline security machine (the only one that holds authority.key); it needs
    # copies of certs/nodes/server-gpu-a.pem, server-gpu-b.pem and stores/smollm2/manifest.json only
    fincluster attest keygen --private authority.key --public authority.pub
    fincluster attest issue --authority-key authority.key --cert certs/nodes/server-gpu-a.pem \
        --tier trusted --zone eu-fra --hardware h100-cc --software-version 0.1.0 \
        --manifest stores/smollm2/manifest.json --ttl 7d --out gpu-a.jwt
    fincluster attest issue --authority-key authority.key --cert certs/nodes/server-gpu-b.pem \
        --tier standard --zone eu-fra --hardware l40s --software-version 0.1.0 \
        --manifest stores/smollm2/manifest.json --ttl 7d --out gpu-b.jwt
    # to every node: authority.pub; to each server: its token
}

registry() {  # on reg1 (policies/ and clearances.toml are the same files on every node)
    fincluster registry --config registry.toml \
        --host "$REGISTRY_HOST" --port "$REGISTRY_PORT" --public-address "$REGISTRY_HOST:$REGISTRY_PORT"
}

serve_a() {  # on gpu-a: bind --host:--port (0.0.0.0: every interface), announce --public-address
    fincluster serve --config server-trusted.toml --registry "$REGISTRY_HOST:$REGISTRY_PORT" \
        --host "$GPU_A_HOST" --port "$SERVER_PORT" --public-address "$GPU_A_HOST:$SERVER_PORT"
}

serve_b() {  # on gpu-b
    fincluster serve --config server-standard.toml --registry "$REGISTRY_HOST:$REGISTRY_PORT" \
        --host "$GPU_B_HOST" --port "$SERVER_PORT" --public-address "$GPU_B_HOST:$SERVER_PORT"
}

client() {  # on the analyst's machine: a smoke test with internal data
    fincluster generate --config client.toml --registry "$REGISTRY_HOST:$REGISTRY_PORT" \
        --classification internal --max-new-tokens 8 "What does a repo rate measure?"
}

case "${1:-}" in
    store | pki | attest | registry | serve_a | serve_b | client) "$1" ;;
    *) echo "usage: deploy/example.sh store|pki|attest|registry|serve_a|serve_b|client" >&2; exit 2 ;;
esac
